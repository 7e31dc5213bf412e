"""Side-by-side benchmarks against the peer implementation, in one run.

    ssd bench [--only loss postprocess] [--json OUT] [--repeats N]   (or python scripts/bench.py ...)

Each row times ours and the peer on identical inputs, checks the outputs agree, and reports
``speedup = peer_s / ours_s`` next to the ``target`` this project promises (README, "Performance").
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ssd.bench.augment import bench_augment
from ssd.bench.model import bench_bn_fold, bench_loss, bench_postprocess, bench_predict
from ssd.bench.voc_eval import bench_voc_eval


BENCHES = {"loss": bench_loss, "postprocess": bench_postprocess, "augment": bench_augment, "voc_eval": bench_voc_eval,
           "predict": bench_predict, "bn_fold": bench_bn_fold}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these rows")
    parser.add_argument("--json", help="write the rows as a JSON list to this file")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per side (median reported)")
    args = parser.parse_args(argv)

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'row':<12} {'ours':>10} {'peer':>10} {'speedup':>8} {'target':>7}  peer")
    for name in args.only or list(BENCHES):
        row = BENCHES[name](args.repeats)
        row["speedup"] = row["peer_s"] / row["ours_s"]
        rows.append(row)
        ok = "ok" if row["speedup"] >= row["target"] else "MISSED"
        print(f"{name:<12} {row['ours_s'] * 1e3:>8.1f}ms {row['peer_s'] * 1e3:>8.1f}ms {row['speedup']:>7.2f}x {row['target']:>6.2f}x  {row['peer']} [{ok}]")
        if row.get("note"):
            print(f"{'':<12} {row['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)  # name, ours_s, peer, peer_s, speedup, target, and any extra numbers of a row
    return 0


if __name__ == "__main__":
    sys.exit(main())
