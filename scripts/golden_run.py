"""A golden run: 200 iterations of the demo recipe on generated shapes, whose losses and mAP must not move.

Record before a refactor, check after each step of it, on the same machine (the numbers depend on the
CPU's kernels, so a reference is never compared across machines):

    .venv/bin/python scripts/golden_run.py --record /tmp/golden.json
    .venv/bin/python scripts/golden_run.py --check /tmp/golden.json    # exit 1 on the first difference
    .venv/bin/python scripts/golden_run.py --check /tmp/golden.json --ignore train_sample_map  # a new key

Compared exactly: every ``metrics.jsonl`` row without its timings (``time``, ``images_per_s``), with
EMA and precise BN on so that their paths are covered too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "train.max_iter=200",
    "train.eval_period=100",
    "train.checkpoint_period=100",
    "train.log_period=20",
    "train.warmup_iters=20",
    "train.ema=0.99",
    "train.precise_bn_batches=2",
    "data.num_workers=0",
]
TIMINGS = ("time", "images_per_s")


def golden_rows(work: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from ssd.config import load_config
    from ssd.data.shapes import ensure_shapes
    from ssd.engine.train import train

    data = ensure_shapes(work / "data", num_train=160, num_val=40, size=160, seed=0)
    roots = [f"data.train.root={data}", f"data.val.root={data}"]
    cfg = load_config(REPO / "configs" / "shapes_tiny.yaml", [*roots, *OVERRIDES])
    train(cfg, work / "run")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="FILE", help="write this machine's reference rows to FILE")
    mode.add_argument("--check", metavar="FILE", help="compare with the rows recorded in FILE")
    parser.add_argument("--ignore", nargs="+", default=[], metavar="KEY", help="keys a change added, left out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = golden_rows(Path(work))
    if args.record:
        Path(args.record).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"recorded {len(rows)} rows to {args.record}")
        return 0
    reference = json.loads(Path(args.check).read_text())
    rows = [{k: v for k, v in row.items() if k not in args.ignore} for row in rows]
    for i, (want, got) in enumerate(zip(reference, rows, strict=False)):
        if want != got:
            diff = {k: (want.get(k), got.get(k)) for k in want.keys() | got.keys() if want.get(k) != got.get(k)}
            print(f"row {i} (iter {want.get('iter')}) differs: {diff}")
            return 1
    if len(reference) != len(rows):
        print(f"{len(rows)} rows, the reference has {len(reference)}")
        return 1
    print(f"golden run: all {len(rows)} rows identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
