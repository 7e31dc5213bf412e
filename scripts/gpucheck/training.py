"""The training steps of a GPU check: ``data`` (the shapes data, the run config, init.pt), then
``ssd train`` in fp16 + channels_last, bf16, resumed, under ``train.sync_debug``, compiled, and on two
GPUs with NCCL; :func:`verify_run` holds the checks every training run shares."""

from __future__ import annotations

import math
import shlex
import shutil
import sys
from pathlib import Path

from .checks import SETTLE, analyse_rows, channels_last_report, compact, number, parameter_change, steady_images_per_s
from .record import Failed, Skipped
from .runs import Check, check_config, eval_rows, load_state, loss_rows


def step_data(check: Check) -> dict:
    """The shapes dataset, the run config (OUT/ssd300_shapes.yaml) and OUT/init.pt, the random
    weights every training run starts from (model.init), so parameter changes can be measured."""
    import torch
    import yaml

    from ssd.checkpoint import make_checkpoint, save_checkpoint
    from ssd.config import ModelConfig, from_dict
    from ssd.data.shapes import SHAPES_CLASSES, ensure_shapes
    from ssd.model import build_ssd

    ensure_shapes(check.shapes, check.s.train_images, check.s.val_images, size=check.s.size, seed=0)
    cfg = check_config(check)
    model_cfg = from_dict(ModelConfig, cfg["model"], "model")
    torch.manual_seed(0)
    model = build_ssd(model_cfg)
    save_checkpoint(make_checkpoint(model.state_dict(), model_cfg, SHAPES_CLASSES, "train"), check.init)
    check.param_names = [name for name, _ in model.named_parameters()]
    cfg["model"]["init"] = str(check.init)
    check.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    params = sum(p.numel() for p in model.parameters())
    return {
        "train_images": check.s.train_images,
        "val_images": check.s.val_images,
        "size": check.s.size,
        "parameters": params,
        "priors": int(model.priors.shape[0]),
        "config": str(check.config),
        "summary": f"{check.s.train_images} + {check.s.val_images} images at {check.s.size} px; "
        f"{model_cfg.arch} {model_cfg.input_size} px, {params / 1e6:.1f} M parameters",
    }


def verify_run(
    check: Check,
    name: str,
    run: Path,
    rows: list[dict],
    expected: list[int],
    scaler: bool,
    before: dict | None = None,
    settle: int = SETTLE,
) -> dict:
    """The checks every training step shares: rows (:func:`analyse_rows`), parameters changed from
    ``before`` (default: init.pt), weights channels_last in last.pt; numbers for the table."""
    numbers, problems = analyse_rows(rows, expected, scaler, settle)
    state = load_state(run / "last.pt")["model"]
    if not check.param_names:
        raise Skipped("needs the data step (init.pt and the parameter names)")
    before = before if before is not None else load_state(check.init)["model"]
    change = parameter_change(before, state, check.param_names)
    layout = channels_last_report(state)
    numbers.update(parameters_changed=change, weights=layout)
    if change["changed"] < change["parameters"]:
        problems.append(
            f"{change['parameters'] - change['changed']} of {change['parameters']} parameters never changed, "
            f"e.g. {', '.join(change['unchanged'])}"
        )
    if layout["channels_last"] < layout["tensors_4d"] or not layout["only_channels_last"]:
        problems.append(
            f"last.pt weights are not channels_last ({layout['channels_last']} of {layout['tensors_4d']} "
            f"4-D tensors; e.g. {', '.join(layout['not_channels_last'])})"
        )
    evals = eval_rows(run)
    ips = steady_images_per_s(rows)
    check.images_per_s[name] = ips or 0.0
    numbers.update(images_per_s=ips, eval_map=evals[-1]["map"] if evals else None, mfu=check.mfu(ips))
    scale = ""
    if numbers.get("grad_scale_last") is not None:
        scale = f", scale {numbers['grad_scale_first']:g}->{numbers['grad_scale_last']:g}"
    numbers["summary"] = (
        f"{numbers['iterations']} its, loss {number(numbers['loss_first'])}->"
        f"{number(numbers['loss_last'])}{scale}, {numbers['skipped']} skipped, "
        f"{change['changed']}/{change['parameters']} params moved, {ips or 0:.0f} img/s"
        + (f", MFU {numbers['mfu']:.1%}" if numbers["mfu"] else "")
    )
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers


def step_fp16_channels_last(check: Check) -> dict:
    """fp16 autocast + GradScaler + channels_last: finite losses, the scale settles, parameters move."""
    run, rows = check.train("fp16", ["train.amp=fp16", "train.channels_last=true"])
    return verify_fp16_run(check, "fp16", run, rows)


def verify_fp16_run(check: Check, name: str, run: Path, rows: list[dict]) -> dict:
    """:func:`verify_run` of an fp16 run logged at every iteration (the GradScaler checks on a GPU)."""
    expected = list(range(1, check.s.iters + 1))
    return verify_run(check, name, run, rows, expected, scaler=not check.cpu)


def step_bf16(check: Check) -> dict:
    """bf16 autocast (no GradScaler), channels_last by default: finite losses, nothing skipped."""
    run, rows = check.train("bf16", ["train.amp=bf16"])
    return verify_run(check, "bf16", run, rows, list(range(1, check.s.iters + 1)), scaler=False)


def as_if_stopped(last: Path, max_iter: int) -> None:
    """Make a finished run's checkpoint one of a run started for ``max_iter`` iterations and stopped: a
    resume continues a run with its own settings and refuses a longer ``train.max_iter``."""
    from ssd.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(last)
    ckpt["full_config"]["train"]["max_iter"] = max_iter
    save_checkpoint(ckpt, last)


def step_resume(check: Check) -> dict:
    """``--resume`` of a copy of the fp16 run on the GPU for a few more iterations: the rows go on where
    they stopped, the GradScaler state comes back (the scale neither restarts nor falls), weights move."""
    src, run = check.run_dir("fp16"), check.run_dir("resume")
    saved = load_state(src / "last.pt")
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(src, run)
    end = check.s.iters + check.s.resume_iters
    as_if_stopped(run / "last.pt", end)
    run, rows = check.train(
        "resume", ["train.amp=fp16", "train.channels_last=true", f"train.max_iter={end}"], resume=True
    )
    new = [r for r in rows if r["iter"] > check.s.iters]
    problems = []
    if [r["iter"] for r in rows] != list(range(1, end + 1)):
        problems.append(
            f"metrics.jsonl after the resume logs iterations {compact([r['iter'] for r in rows])}, expected 1..{end}"
        )
    saved_scale = saved.get("scaler", {}).get("scale")
    if not check.cpu and new and saved_scale is not None and new[0].get("grad_scale") != saved_scale:
        problems.append(f"the resumed GradScaler scale is {new[0].get('grad_scale')}, last.pt saved {saved_scale}")
    try:  # the resumed steps continue a settled run: no scale drop and no skip at all
        numbers = verify_run(
            check,
            "resume",
            run,
            new,
            list(range(check.s.iters + 1, end + 1)),
            scaler=not check.cpu,
            before=saved["model"],
            settle=check.s.iters,
        )
    except Failed as e:
        numbers, problems = e.numbers, problems + [str(e)]
    numbers.update(
        resumed_at=saved.get("iteration"), saved_scale=saved_scale, loss_before=saved_loss(rows, check.s.iters)
    )
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers


def saved_loss(rows: list[dict], iteration: int) -> float | None:
    return next((r["loss"] for r in rows if r["iter"] == iteration), None)


def step_sync_debug(check: Check) -> dict:
    """``train.sync_debug``: steady-state steps (between log steps) run under
    ``torch.cuda.set_sync_debug_mode("error")``; any host-device sync in them fails the run."""
    period = 10 if check.s.iters >= 20 else 2
    run, rows = check.train("sync_debug", ["train.sync_debug=true", f"train.log_period={period}"])
    expected = list(range(period, check.s.iters + 1, period))
    return verify_run(check, "sync_debug", run, rows, expected, scaler=True, settle=period)


def step_compile(check: Check) -> dict:
    """``train.compile`` (mode default) with fp16 + channels_last: the same checks as eager, and the
    first step's time (mostly compilation) and the steady speed against eager fp16."""
    run, rows = check.train("compile", ["train.compile=true"], timeout=480)
    numbers = verify_fp16_run(check, "compile", run, rows)
    eager = check.images_per_s.get("fp16")
    numbers.update(
        first_step_s=rows[0]["time"] if rows else None,
        speedup_vs_eager=numbers["images_per_s"] / eager if eager else None,
    )
    return numbers


def step_nccl_2gpu(check: Check) -> dict:
    """Two processes on two GPUs (NCCL): SyncBatchNorm, precise BN before each evaluation, 2 loader
    workers per rank; losses finite, evaluations at 10 and 20, BN statistics finite."""
    import yaml

    if check.gpus < 2:
        raise Skipped(f"{check.gpus} GPU here: the 2-process NCCL run needs 2 or more")
    cfg = yaml.safe_load(check.config.read_text())
    # BN in every block; init.pt has no BN tensors
    cfg["model"].update(batch_norm="all", init=None)
    config = check.out / "ssd300_bn_shapes.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = check.run_dir("nccl_2gpu")
    shutil.rmtree(run, ignore_errors=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = shlex.split(
        f"-m ssd train {config} --output-dir {run} train.bn=sync train.precise_bn_batches=2 "
        "train.precise_bn_before_eval=true data.num_workers=2 train.max_iter=20 "
        "train.eval_period=10 train.log_period=5"
    )
    log = check.call("nccl_2gpu", [*torchrun, *args], 420)
    numbers, problems = analyse_rows(loss_rows(run), [5, 10, 15, 20], scaler=True, settle=10)
    evals = eval_rows(run)
    running = [v for k, v in load_state(run / "last.pt")["model"].items() if k.endswith("running_var")]
    numbers.update(evals_at=[r["iter"] for r in evals], maps=[r["map"] for r in evals], bn_layers=len(running))
    if [r["iter"] for r in evals] != [10, 20] or not all(math.isfinite(m) for m in numbers["maps"]):
        problems.append(
            f"evaluations at {numbers['evals_at']} with mAP {numbers['maps']}, expected finite ones at 10 and 20"
        )
    if "precise BN at iteration 10" not in log.read_text():
        problems.append("no 'precise BN at iteration 10' in the log (precise_bn_before_eval)")
    if not running or not all(bool(v.isfinite().all()) for v in running):
        problems.append(f"BN running variances missing or non-finite ({len(running)} layers)")
    numbers["summary"] = f"2 ranks, {numbers['iterations']} logged, mAP {numbers['maps']}, {len(running)} BN layers"
    if problems:
        raise Failed("; ".join(problems), numbers)
    return numbers
