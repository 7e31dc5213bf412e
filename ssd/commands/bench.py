"""``ssd bench``: side-by-side speed against the peer implementations (the lab in :mod:`ssd.bench`)."""

from __future__ import annotations

import argparse

from ssd.bench import main as bench_main


def run(args: argparse.Namespace) -> int:
    return bench_main(args.bench_args, prog="ssd bench")
