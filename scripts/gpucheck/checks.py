"""The rules a GPU check judges by, as pure functions of what the runs wrote (tests/test_gpu_check.py
runs them): the loss rows and the GradScaler's scale and skips, the weights' layout, how far the
parameters moved, GPU vs CPU evaluations, and the short forms used in messages and the table."""

from __future__ import annotations

import math
import statistics

INIT_SCALE = 65536.0  # torch.amp.GradScaler's default init_scale
SETTLE = 10  # the GradScaler scale may fall in iterations 1..SETTLE, never after
MAP_TOLERANCE = 1e-4  # ssd eval on the GPU (fp32, TF32 off) vs the CPU


def analyse_rows(
    rows: list[dict], expected_iters: list[int], scaler: bool, settle: int = SETTLE
) -> tuple[dict, list[str]]:
    """Numbers and problems of the metrics.jsonl loss rows of one run.

    Every expected iteration is logged, losses are finite, and no step was skipped (``skipped``:
    non-finite loss or gradients). With ``scaler`` (fp16), ``grad_scale`` may fall (an overflow,
    the step skipped) only in iterations up to ``settle``; after them it stays and nothing is skipped."""
    problems = []
    iters = [r["iter"] for r in rows]
    if iters != expected_iters:
        problems.append(f"logged iterations {compact(iters)}, expected {compact(expected_iters)}")
    # a window whose steps were all skipped logs no loss (null); a logged loss is a mean of updating steps
    bad = [
        r["iter"]
        for r in rows
        if any(r.get(k) is not None and not math.isfinite(float(r[k])) for k in ("loss", "loc", "conf"))
    ]
    if bad:
        problems.append(f"non-finite loss at iteration(s) {compact(bad)}")
    empty = [r["iter"] for r in rows if r.get("loss") is None and not r.get("skipped")]
    if empty:
        problems.append(f"no loss logged at iteration(s) {compact(empty)}")
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    numbers = {
        "iterations": len(rows),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    if rows and any("skipped" not in r for r in rows):
        problems.append("metrics.jsonl rows have no 'skipped' count (an engine older than this check)")
    skipped_at = [r["iter"] for r in rows if r.get("skipped", 0)]
    numbers["skipped"] = sum(r.get("skipped", 0) for r in rows)
    if not scaler:
        if skipped_at:
            problems.append(f"steps skipped at iteration(s) {compact(skipped_at)}")
        return numbers, problems
    scales = [r.get("grad_scale") for r in rows]
    if rows and any(s is None for s in scales):
        problems.append("metrics.jsonl rows have no grad_scale (an engine older than this check)")
        return numbers, problems
    drops = [r["iter"] for r, before in zip(rows, [INIT_SCALE] + scales[:-1], strict=True) if r["grad_scale"] < before]
    numbers.update(
        grad_scale_first=scales[0] if scales else None,
        grad_scale_last=scales[-1] if scales else None,
        scale_drops_at=drops,
        skipped_at=skipped_at,
    )
    late_drops, late_skips = ([i for i in drops if i > settle], [i for i in skipped_at if i > settle])
    if late_drops:
        problems.append(f"the GradScaler scale fell at iteration(s) {compact(late_drops)}, after the first {settle}")
    if late_skips:
        problems.append(f"steps skipped at iteration(s) {compact(late_skips)}, after the first {settle}")
    return numbers, problems


def number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compact(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1..3, 7`` (iteration lists in messages)."""
    runs, out = [], []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    for a, b in runs:
        out.append(str(a) if a == b else f"{a}..{b}")
    return ", ".join(out) or "none"


def steady_images_per_s(rows: list[dict], skip_first: int = 3) -> float | None:
    """Median images/s of the logged windows after the first ``skip_first`` (warm-up, cuDNN autotuning)."""
    values = [r["images_per_s"] for r in rows[skip_first:]] or [r["images_per_s"] for r in rows[-1:]]
    return statistics.median(values) if values else None


def channels_last_report(state: dict) -> dict:
    """How many 4-D float tensors of a state dict are channels_last. A tensor with 1x1 kernels or one
    input channel is both layouts at once; ``strict`` counts those that are only channels_last."""
    import torch

    four_d = {k: v for k, v in state.items() if v.ndim == 4 and v.is_floating_point()}
    cl = [k for k, v in four_d.items() if v.is_contiguous(memory_format=torch.channels_last)]
    strict = [k for k in cl if not four_d[k].is_contiguous()]
    return {
        "tensors_4d": len(four_d),
        "channels_last": len(cl),
        "only_channels_last": len(strict),
        "not_channels_last": [k for k in four_d if k not in cl][:5],
    }


def parameter_change(before: dict, after: dict, names: list[str]) -> dict:
    """Which of the parameters ``names`` differ between two state dicts, and by how much (median of
    ``|after - before| / |before|`` over the tensors)."""
    import torch

    changed, rel = [], []
    for name in names:
        a, b = before[name].float(), after[name].float()
        if not torch.equal(a, b):
            changed.append(name)
        rel.append(float((b - a).norm() / a.norm().clamp_min(1e-12)))
    unchanged = [n for n in names if n not in changed]
    return {
        "changed": len(changed),
        "parameters": len(names),
        "unchanged": unchanged[:5],
        "median_relative_change": statistics.median(rel) if rel else 0.0,
    }


def compare_evals(a: dict, b: dict, top: int = 10) -> dict:
    """Two :func:`run_eval` results: mAP and per-class AP differences, detection counts, and the
    largest difference between the ``top`` highest scores of an image (rank by rank)."""
    per_class = [abs((a["per_class"][k] or 0) - (b["per_class"][k] or 0)) for k in a["per_class"]]
    scores = [{}, {}]
    for side, dets in zip(scores, (a["dets"], b["dets"]), strict=True):
        for d in dets:
            side.setdefault(d["image_id"], []).append(d["score"])
    diffs, count_differs = [0.0], []
    for image in sorted(set(scores[0]) | set(scores[1])):
        sa = sorted(scores[0].get(image, []), reverse=True)
        sb = sorted(scores[1].get(image, []), reverse=True)
        if len(sa) != len(sb):
            count_differs.append(image)
        diffs += [abs(x - y) for x, y in zip(sa[:top], sb[:top], strict=False)]
    return {
        "map": [a["map"], b["map"]],
        "map_diff": abs(a["map"] - b["map"]),
        "per_class_max_diff": max(per_class, default=0.0),
        "detections": [len(a["dets"]), len(b["dets"])],
        "images_with_other_counts": len(count_differs),
        "top_score_max_diff": max(diffs),
    }


def bench_cell(row: dict) -> str:
    """``name 12.3 ms (1.40x)`` of a bench row; a row without a peer shows its MFU if it has one."""
    cell = f"{row.get('name')} {row.get('ours_s', math.nan) * 1e3:.1f} ms"
    if row.get("speedup") is not None:
        return f"{cell} ({row['speedup']:.2f}x)"
    return f"{cell} (MFU {row['mfu']:.1%})" if row.get("mfu") is not None else cell
