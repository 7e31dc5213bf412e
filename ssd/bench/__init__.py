"""Side-by-side benchmarks against the peer implementation, in one run.

    ssd bench [--only loss postprocess] [--json OUT] [--repeats N] [--device cpu|cuda]
    (or: python scripts/bench.py ...)

Each row times ours and the peer on identical inputs, checks the outputs agree, and reports
``speedup = peer_s / ours_s`` next to the ``target`` this project promises (README and docs/performance.md),
except where a row says otherwise (``train_step``: the median of paired per-round ratios).
``--device cuda`` runs the GPU rows instead: ``train_step`` under autocast bf16 and fp16, ``predict``
on the GPU, and ``train_loop`` (the whole training loop, images/s and MFU; it has no peer).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable

import torch

from ssd.bench.augment import bench_augment
from ssd.bench.cuda import bench_train_loop
from ssd.bench.int8 import bench_predict_int8
from ssd.bench.loader import bench_loader
from ssd.bench.model import bench_bn_fold, bench_loss, bench_postprocess, bench_predict
from ssd.bench.train import bench_train_step, bench_train_step_cuda
from ssd.bench.voc_eval import bench_voc_eval

# a row function takes the repeats and returns one row (a dict) or several
BENCHES: dict[str, dict[str, Callable[[int], dict | list[dict]]]] = {
    "cpu": {
        "loss": bench_loss,
        "postprocess": bench_postprocess,
        "augment": bench_augment,
        "voc_eval": bench_voc_eval,
        "predict": bench_predict,
        "predict_int8": bench_predict_int8,
        "bn_fold": bench_bn_fold,
        "train_step": bench_train_step,
        "loader": bench_loader,
    },
    "cuda": {
        "train_step": bench_train_step_cuda,
        "predict": functools.partial(bench_predict, device="cuda"),
        "train_loop": bench_train_loop,
    },
}


def format_row(row: dict) -> str:
    """One line of the table; a row without a peer (``peer_s`` None) shows its own time only."""
    ours = f"{row['name']:<16} {row['ours_s'] * 1e3:>8.1f}ms"
    if row.get("peer_s") is None:
        return f"{ours} {'-':>10} {'-':>8} {'-':>7}  {row['peer']}"
    peer = f"{row['peer_s'] * 1e3:>8.1f}ms {row['speedup']:>7.2f}x"
    if row.get("target") is None:
        return f"{ours} {peer} {'-':>7}  {row['peer']}"
    ok = "ok" if row["speedup"] >= row["target"] else "MISSED"
    return f"{ours} {peer} {row['target']:>6.2f}x  {row['peer']} [{ok}]"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = sorted({name for rows in BENCHES.values() for name in rows})
    parser.add_argument("--only", nargs="+", choices=names, help="run only these rows")
    parser.add_argument("--json", help="write the rows as a JSON list to this file")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per side")
    parser.add_argument("--device", choices=list(BENCHES), default="cpu", help="cpu rows (default) or the GPU rows")
    args = parser.parse_args(argv)
    benches = BENCHES[args.device]
    if args.device == "cuda" and not torch.cuda.is_available():
        cuda = torch.version.cuda or "none"
        parser.error(
            f"--device cuda: CUDA is not available here (torch {torch.__version__}, built for "
            f"CUDA {cuda}); the CPU rows run with --device cpu"
        )
    wrong = [name for name in args.only or [] if name not in benches]
    if wrong:
        valid = ", ".join(benches)
        parser.error(f"--only {' '.join(wrong)}: not a {args.device} row ({args.device} rows: {valid})")

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{'row':<16} {'ours':>10} {'peer':>10} {'speedup':>8} {'target':>7}  peer")
    for name in args.only or list(benches):
        result = benches[name](args.repeats)
        for row in result if isinstance(result, list) else [result]:
            peer_s = row.get("peer_s")
            if "speedup" not in row:  # a row may measure it otherwise (train_step: paired rounds)
                row["speedup"] = None if peer_s is None else peer_s / row["ours_s"]
            rows.append(row)
            print(format_row(row))
            if row.get("note"):
                print(f"{'':<16} {row['note']}")
    if args.json:
        with open(args.json, "w") as f:
            # name, ours_s, peer, peer_s, speedup, target, and each row's extra numbers
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
