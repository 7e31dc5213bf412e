"""How often ``ssd bn-report`` flags a healthy model (false alarms), and how often it flags a layer whose
running statistics were shifted on purpose (detection), over many sampling seeds.

    python scripts/bn_report_rates.py --weights CKPT --config CFG [key=value ...] [--seeds 300] [--batches 8]
    python scripts/bn_report_rates.py --tiny DIR [--seeds 300] [--batches 8]    # two tiny models, made in DIR

A seed is the ``train.seed`` of the measured batches: which images, in which order, with which augmentation.
Each seed's batches are measured once; every layer is then judged with its own running statistics (false
alarms) and with one perturbation at a time, every channel of one layer: ``running_mean`` shifted by one
standard deviation, ``running_var`` multiplied or divided by 4 (detection). A perturbation is expected to
be detected in the layers whose threshold (raised for their sampling noise) is below the gap it produces;
for the others the script gives the smallest shift it detects in 95% of the seeds. ``--tiny`` trains two
width-1/8 64 px models (BN in every block, with and without the heads' BN) for a few iterations on
generated shapes and recomputes their statistics with precise BN over 30 batches: healthy by construction.
See docs/batchnorm.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ssd.engine.bn import bn_layers, precise_bn
from ssd.engine.bn_report import DEFAULT_BATCHES, BatchStatistics, judge_layer, measure_batches, report_setup

MEAN_SHIFTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # in standard deviations
VAR_FACTORS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0)
DETECTED = 0.95


@contextmanager
def perturbed(m: nn.modules.batchnorm._BatchNorm, kind: str, amount: float) -> Iterator[None]:
    """Layer ``m`` with every channel's ``running_mean`` shifted by ``amount`` standard deviations
    (``kind="mean"``) or its ``running_var`` multiplied by ``amount`` (``kind="var"``); restored after."""
    assert m.running_mean is not None and m.running_var is not None
    saved = m.running_mean.clone(), m.running_var.clone()
    with torch.no_grad():
        if kind == "mean":
            m.running_mean += amount * (m.running_var + m.eps).sqrt()
        else:
            m.running_var.mul_(amount)
    try:
        yield
    finally:
        with torch.no_grad():
            m.running_mean.copy_(saved[0])
            m.running_var.copy_(saved[1])


def measure_seeds(
    model: nn.Module, batches: Callable[[int], object], prepare, criterion, seeds: range, num_batches: int
) -> list[BatchStatistics]:
    """One :func:`measure_batches` per seed (``batches(seed)``: that seed's loader)."""
    return [measure_batches(model, batches(seed), prepare, criterion, num_batches) for seed in seeds]


def flag_rate(m: nn.modules.batchnorm._BatchNorm, name: str, measured: list[BatchStatistics]) -> float:
    """The share of the measured seeds in which layer ``name`` is flagged drifted as it is now."""
    return sum(judge_layer(name, m, stats).drifted for stats in measured) / len(measured)


def false_alarms(model: nn.Module, measured: list[BatchStatistics]) -> dict:
    """Seeds in which any layer is flagged, and how often each layer is."""
    flagged = [[name for name, m in bn_layers(model) if judge_layer(name, m, stats).drifted] for stats in measured]
    per_layer: dict[str, int] = {}
    for names in flagged:
        for name in names:
            per_layer[name] = per_layer.get(name, 0) + 1
    return {"seeds": len(measured), "rate": sum(bool(f) for f in flagged) / len(measured), "per_layer": per_layer}


def smallest_detected(m, name: str, kind: str, measured: list[BatchStatistics]) -> float | None:
    """The smallest shift of the grid that is flagged in >= 95% of the seeds (None: none of them)."""
    grid = MEAN_SHIFTS if kind == "mean" else VAR_FACTORS
    for amount in grid:
        with perturbed(m, kind, amount):
            if flag_rate(m, name, measured) >= DETECTED:
                return amount
    return None


def detection(model: nn.Module, measured: list[BatchStatistics]) -> list[dict]:
    """Per layer: each perturbation's gap and threshold (medians over seeds), whether it is expected to be
    detected (threshold below the gap), its detection rate, and the smallest shifts detected."""
    rows = []
    for name, m in bn_layers(model):
        row: dict = {"layer": name}
        for label, kind, amount in (("mean+1sd", "mean", 1.0), ("var*4", "var", 4.0), ("var/4", "var", 0.25)):
            with perturbed(m, kind, amount):
                judged = [judge_layer(name, m, stats) for stats in measured]
            gap = statistics.median(j.mean_gap if kind == "mean" else j.var_gap for j in judged)
            limit = statistics.median(j.mean_threshold if kind == "mean" else j.var_threshold for j in judged)
            rate = sum(j.drifted for j in judged) / len(judged)
            row[label] = {"gap": gap, "threshold": limit, "expected": limit < gap, "rate": rate}
        row["smallest_mean_shift"] = smallest_detected(m, name, "mean", measured)
        row["smallest_var_factor"] = smallest_detected(m, name, "var", measured)
        rows.append(row)
    return rows


def summarize(name: str, model: nn.Module, measured: list[BatchStatistics]) -> dict:
    rows = detection(model, measured)
    expected = [(r[k]["rate"]) for r in rows for k in ("mean+1sd", "var*4", "var/4") if r[k]["expected"]]
    return {
        "model": name,
        "layers": len(rows),
        "false_alarms": false_alarms(model, measured),
        "detection_expected": len(expected),
        "detection_min_rate": min(expected) if expected else None,
        "detection": rows,
    }


def format_summary(s: dict) -> str:
    fa = s["false_alarms"]
    lines = [
        f"{s['model']}: false alarms in {fa['rate']:.1%} of {fa['seeds']} seeds"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(fa['per_layer'].items()))})" if fa["per_layer"] else ""),
        f"  detection where the threshold is below the perturbation's gap: {s['detection_expected']} "
        f"(layer, perturbation) pairs, lowest rate {s['detection_min_rate']:.1%}"
        if s["detection_min_rate"] is not None
        else "  no layer's threshold is below any perturbation's gap",
    ]
    for r in s["detection"]:
        missed = [k for k in ("mean+1sd", "var*4", "var/4") if not r[k]["expected"]]
        if missed:
            lines.append(
                f"  {r['layer']}: not expected for {', '.join(missed)} (thresholds "
                f"{r['mean+1sd']['threshold']:.2f} / {r['var*4']['threshold']:.2f}); smallest detected: mean shift "
                f"{r['smallest_mean_shift']} sd, variance factor {r['smallest_var_factor']}"
            )
    return "\n".join(lines)


def tiny_models(out: Path, num_batches: int) -> Iterator[tuple[str, nn.Module, Callable, Callable, Callable]]:
    """The two healthy tiny models (see the module docstring) with their batches, prepare and criterion."""
    import yaml

    from ssd.checkpoint import model_from_checkpoint
    from ssd.config import load_config
    from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
    from ssd.engine.train import train

    data = out / "shapes"
    if not (data / "shapes.json").is_file():
        generate_shapes(data, 40, 10, size=64, seed=5)
    dataset = {"format": "voc", "root": str(data), "classes": SHAPES_CLASSES}
    for name, blocks in (("tiny", "all"), ("tiny_heads", ["all", "heads"])):
        extras = [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}]
        model = {"num_classes": 5, "input_size": 64, "width": 0.125, "batch_norm": blocks, "extras": extras}
        run_dict = {
            "model": {**model, "dropout": 0.0},
            "data": {"train": {**dataset, "split": "train"}, "val": {**dataset, "split": "val"}, "num_workers": 0},
            "train": {"max_iter": 4, "batch_size": 4, "optimizer": "adamw", "lr": 3e-3, "warmup_iters": 0},
        }
        run_dict["train"].update(device="cpu", checkpoint_period=100, eval_period=100, seed=1, tensorboard=False)
        config = out / f"{name}.yaml"
        config.write_text(yaml.safe_dump(run_dict, sort_keys=False))
        if not (out / name / "last.pt").is_file():
            train(load_config(config), out / name)
        model, ckpt = model_from_checkpoint(out / name / "last.pt")
        batches, prepare, criterion = report_setup(load_config(config), model, ckpt, out / name, config, num_batches)
        epochs = (batches(100 + i) for i in range(3))
        precise_bn(model, (b for epoch in epochs for b in epoch), lambda m, b, f=prepare: m(f(b)[0]), 30)
        yield name, model, batches, prepare, criterion


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bn_report_rates.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", help="checkpoint to measure (with --config)")
    p.add_argument("--config", help="YAML config whose data.train provides the batches")
    p.add_argument("--tiny", type=Path, help="make and measure the two tiny models in this folder instead")
    p.add_argument("--seeds", type=int, default=300, help="sampling seeds (default 300)")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="batches per report (as ssd bn-report)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    if bool(args.tiny) == bool(args.weights and args.config):
        p.error("give either --weights and --config, or --tiny DIR")
    if args.tiny:
        args.tiny.mkdir(parents=True, exist_ok=True)
        models = list(tiny_models(args.tiny, args.batches))
    else:
        from ssd.checkpoint import model_from_checkpoint
        from ssd.config import load_config

        model, ckpt = model_from_checkpoint(args.weights)
        cfg = load_config(args.config, args.overrides)
        setup = report_setup(cfg, model, ckpt, args.weights, args.config, args.batches)
        models = [(str(args.weights), model, *setup)]
    results = []
    for name, model, batches, prepare, criterion in models:
        t0 = time.perf_counter()
        measured = measure_seeds(model, batches, prepare, criterion, range(args.seeds), args.batches)
        summary = summarize(name, model, measured)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        print(format_summary(summary), flush=True)
        results.append(summary)
    if args.json:
        args.json.write_text(json.dumps({"batches": args.batches, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
