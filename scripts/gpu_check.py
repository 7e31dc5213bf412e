#!/usr/bin/env python3
"""The GPU check: the project's CUDA paths in one run of a few minutes (docs/gpu.md).

    bash scripts/gpu_check.sh [--out DIR]           # installs the project first, then runs this file
    python scripts/gpu_check.py [--out DIR] [--only STEP ...] [--skip STEP ...] [--pytest] [--list]
    python scripts/gpu_check.py --cpu [--out DIR]   # rehearse the check itself on a CPU (tiny model)

A full-size SSD300 trains ~30 iterations on generated shapes in each setting (fp16 + channels_last,
bf16, ``train.compile``), resumes, loads on the CPU, evaluates on both devices, trains under
``train.sync_debug``, then come the CUDA bench rows and, with 2+ GPUs, a 2-process NCCL run.

Each step is a function ``(Check) -> numbers``. :class:`Report` records ``{name, ok, seconds, numbers,
error}`` in OUT/gpu_check.json when the step starts ("running") and again when it ends, so a run that is
cut off still says what it did; a failing step does not stop the next. Training and evaluation run as
``python -m ssd`` subprocesses with one log each in OUT/logs/, so a CUDA error in one cannot poison the
next. Exit code 0 when no step failed, 1 when one did, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

# the check itself lives in scripts/gpucheck/ (one module a concept; its __init__ lists them); when
# this file is loaded by path (tests/test_gpu_check.py), scripts/ is not on sys.path yet
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from gpucheck.checks import analyse_rows, bench_cell, channels_last_report, compare_evals, parameter_change
from gpucheck.record import Failed, Report, Skipped, format_table
from gpucheck.runs import REHEARSAL, REPO, Check, Settings, log_error
from gpucheck.steps import ALWAYS, STEPS, Step
from gpucheck.weights import load_on_cpu, ssd_without_tf32

# what tests/test_gpu_check.py reaches through this module, besides main
__all__ = [
    "REPO",
    "Failed",
    "Report",
    "Skipped",
    "analyse_rows",
    "bench_cell",
    "channels_last_report",
    "compare_evals",
    "log_error",
    "main",
    "parameter_change",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [s.name for s in STEPS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="runs/gpu_check", help="output folder: gpu_check.json, logs/, runs/ (default runs/gpu_check)"
    )
    p.add_argument(
        "--only", nargs="+", choices=names, metavar="STEP", help="run only these steps (and environment, cuda, data)"
    )
    p.add_argument("--skip", nargs="+", choices=names, default=[], metavar="STEP", help="leave these steps out")
    p.add_argument(
        "--pytest", action="store_true", help="also run pytest -m cuda tests/test_cuda.py at the end (a few minutes)"
    )
    p.add_argument(
        "--cpu", action="store_true", help="rehearse the check on the CPU with a tiny model (CUDA-only steps skipped)"
    )
    p.add_argument("--iters", type=int, help="training iterations per run (default 30; 4 with --cpu)")
    p.add_argument("--list", action="store_true", help="list the steps and what each checks, then exit")
    p.add_argument("--show", action="store_true", help="print the table of OUT/gpu_check.json (e.g. of a cut-off run)")
    return p.parse_args(argv)


def plan(step: Step, args: argparse.Namespace, blocked: str | None) -> str | None:
    """None when ``step`` runs, else why it is skipped (recorded as such)."""
    if blocked and step.name not in ("environment", "cuda"):
        return blocked
    if step.name in args.skip:
        return "left out (--skip)"
    if args.cpu and step.cuda_only:
        return "needs CUDA (CPU rehearsal)"
    if args.cpu and step.name == "compile" and not args.only:
        return "minutes on a CPU: run it with --only compile (CPU rehearsal)"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if str(REPO) not in sys.path:  # ssd from this checkout, even when it is not installed
        sys.path.append(str(REPO))
    # internal entry points of the subprocesses (before argparse: ssd's own options follow)
    if argv[:1] == ["--ssd-no-tf32"]:
        return ssd_without_tf32(argv[1:])
    if argv[:1] == ["--load-on-cpu"]:
        return load_on_cpu(argv[1])
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.list:
        for step in STEPS:
            print(f"{step.name:<20} {' '.join((step.fn.__doc__ or '').split())}")
        return 0
    if args.show:
        print(format_table(json.loads((out / "gpu_check.json").read_text()), out / "gpu_check.json"))
        return 0
    settings = REHEARSAL if args.cpu else Settings()
    if args.iters:
        settings = Settings(**{**asdict(settings), "iters": args.iters})
    check = Check(out, args.cpu, settings)
    meta = {"argv": argv, "settings": asdict(settings), "rehearsal_on_cpu": args.cpu}
    report = Report(out / "gpu_check.json", meta)
    # a time limit's SIGTERM: the running step is recorded as interrupted
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        run_steps(check, report, args)
        code = 0
    except KeyboardInterrupt:
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.finish()
    print("\n" + report.table())
    return code or (1 if report.failed else 0)


def run_steps(check: Check, report: Report, args: argparse.Namespace) -> None:
    """Run or skip each step in order, printing one line per step as it ends."""
    blocked = None
    for step in STEPS:
        if args.only:
            wanted = step.name in args.only or step.name in ALWAYS
        else:
            wanted = not step.optional or args.pytest
        if not wanted:
            continue
        reason = plan(step, args, blocked)
        rec = report.skip(step.name, reason) if reason else report.run(step.name, step.fn, check)
        print(f"gpu_check: {step.name} {rec['status']}: {rec['error'] or rec['summary']}", flush=True)
        if step.name == "cuda" and rec["ok"] is False:
            blocked = "no CUDA device"
            print("gpu_check: no CUDA device; the GPU steps are skipped", flush=True)


def interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
