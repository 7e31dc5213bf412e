"""The steps on the fp16 run's trained weights: ``cpu_load`` (the checkpoint in a process that sees no
GPU) and ``eval_gpu_vs_cpu`` (``ssd eval`` on both devices, compared), with the code those
subprocesses run (``gpu_check.py --load-on-cpu`` and ``--ssd-no-tf32``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .checks import MAP_TOLERANCE, channels_last_report, compare_evals
from .machine import tf32_off
from .record import Failed, Skipped
from .runs import SCRIPT, Check, eval_rows


def fp16_weights(check: Check) -> Path:
    """The fp16 run's last.pt, which the steps here start from; Skipped when it is not there."""
    path = check.run_dir("fp16") / "last.pt"
    if not path.exists():
        raise Skipped(f"needs {path} (the fp16_channels_last step)")
    return path


def step_cpu_load(check: Check) -> dict:
    """The fp16 run's last.pt in a process that sees no GPU: it loads, builds and predicts finite outputs."""
    path = fp16_weights(check)
    log = check.call(
        "cpu_load", [sys.executable, str(SCRIPT), "--load-on-cpu", str(path)], 300, CUDA_VISIBLE_DEVICES=""
    )
    result = json.loads(log.read_text().strip().splitlines()[-1])
    problems = [
        text
        for bad, text in [
            (result["cuda_available"], "CUDA was visible"),
            (not result["finite"], "non-finite outputs"),
            (result["devices"] != ["cpu"], f"parameters on {result['devices']}"),
        ]
        if bad
    ]
    result["summary"] = (
        f"iteration {result['iteration']}, {result['tensors']} tensors "
        f"({result['channels_last_in_file']} channels_last in the file), outputs finite: {result['finite']}"
    )
    if problems:
        raise Failed("; ".join(problems), result)
    return result


def load_on_cpu(path: str) -> int:
    """``--load-on-cpu CKPT`` (run by :func:`step_cpu_load` with CUDA hidden): print one JSON line."""
    import torch

    from ssd.checkpoint import model_from_checkpoint

    model, ckpt = model_from_checkpoint(path)
    model.eval()
    size = int(model.input_size)
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
    print(
        json.dumps(
            {
                "cuda_available": torch.cuda.is_available(),
                "iteration": ckpt.get("iteration"),
                "tensors": len(ckpt["model"]),
                "channels_last_in_file": channels_last_report(ckpt["model"])["only_channels_last"],
                "devices": sorted({str(p.device) for p in model.parameters()}),
                "finite": all(bool(torch.isfinite(v).all()) for v in out.values()),
            }
        )
    )
    return 0


def step_eval_gpu_vs_cpu(check: Check) -> dict:
    """``ssd eval`` of the fp16 run's last.pt on the GPU (fp32: train.amp=none, TF32 off) and on
    the CPU: the same VOC07 mAP to 1e-4; the detections themselves are compared too."""
    weights = fp16_weights(check)
    gpu = run_eval(check, "gpu", weights, check.device, NVIDIA_TF32_OVERRIDE="0")
    cpu = run_eval(check, "cpu", weights, "cpu", CUDA_VISIBLE_DEVICES="")
    numbers = compare_evals(gpu, cpu)
    train_evals = eval_rows(check.run_dir("fp16"))
    numbers["map_training_eval"] = train_evals[-1]["map"] if train_evals else None
    numbers["summary"] = (
        f"mAP {check.device.upper()} {gpu['map']:.5f} vs CPU {cpu['map']:.5f} "
        f"(diff {numbers['map_diff']:.1e}); {numbers['detections'][0]} vs "
        f"{numbers['detections'][1]} detections, top-10 scores within "
        f"{numbers['top_score_max_diff']:.1e}"
    )
    if numbers["map_diff"] > MAP_TOLERANCE or numbers["per_class_max_diff"] > MAP_TOLERANCE:
        raise Failed(
            f"mAP differs by {numbers['map_diff']:.2e} (per class up to "
            f"{numbers['per_class_max_diff']:.2e}), more than {MAP_TOLERANCE:g}",
            numbers,
        )
    return numbers


def ssd_without_tf32(argv: list[str]) -> int:
    """``--ssd-no-tf32 ARGS``: ``ssd ARGS`` with TF32 off (full fp32 matmuls and convolutions)."""
    from ssd.cli import main

    with tf32_off():
        return main(argv)


def run_eval(check: Check, label: str, weights: Path, device: str, **env: str) -> dict:
    """``ssd eval`` with TF32 off and train.amp=none (fp32) into OUT/eval/LABEL: its metrics
    JSON plus ``dets`` (the detections.json list)."""
    out = check.out / "eval" / label
    shutil.rmtree(out, ignore_errors=True)
    args = ["eval", str(check.config), "--weights", str(weights), "--device", device]
    args += ["--json", str(out / "metrics.json"), "--out-dir", str(out), "train.amp=none"]
    check.call(f"eval_{label}", [sys.executable, str(SCRIPT), "--ssd-no-tf32", *args], 300, **env)
    result = json.loads((out / "metrics.json").read_text())
    result["dets"] = json.loads((out / "detections.json").read_text())
    return result
