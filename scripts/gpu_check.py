#!/usr/bin/env python3
"""The GPU check: a list of real commands, run one after another on a GPU machine (docs/gpu.md).

    bash scripts/gpu_check.sh [--out DIR] [--size tiny|full] [--only NAME ...]   # installs, then runs this
    python scripts/gpu_check.py --dry-run                                         # print the commands only

Each command's record (name, command, status, exit code, seconds, the tail of its output and the
numbers of its JSON output) is written to OUT/gpu_check.json as it starts and as it ends, so a run
that is cut off says where it stopped. Exit code 0 when every command passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLASSES = "[circle,square,triangle,star]"
# per size: the config the training runs start from, the side of the generated images, and the overrides
# that put the config on those images (the paper's SSD300 has VOC's 20 classes and an ImageNet trunk)
SIZES = {
    "tiny": ("configs/shapes_tiny.yaml", 128, []),
    "full": (
        "configs/ssd300_vgg16_voc0712.yaml",
        300,
        ["model.num_classes=5", "model.init_backbone=null"]
        + [f"data.{s}.{k}={v}" for s in ("train", "val") for k, v in (("split", s), ("classes", CLASSES))],
    ),
}
# what the machine is, and whether everything the later commands need imports; exits 1 without a GPU
ENVIRONMENT = (
    "import json, sys, torch, torchvision, albumentations, pycocotools.coco, ssd; c = torch.cuda.is_available(); "
    'json.dump({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, '
    '"torchvision": torchvision.__version__, "albumentations": albumentations.__version__, '
    '"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name() if c else None, '
    '"bf16": c and torch.cuda.is_bf16_supported()}, open(sys.argv[1], "w")); '
    'c or sys.exit(f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU")'
)


def command(name: str, argv: list[str], output: Path | None = None, fresh: Path | None = None, **env: str) -> dict:
    """One command: ``output`` is the JSON (or JSON lines) it writes, ``fresh`` a path removed before it runs."""
    return {"name": name, "argv": argv, "output": output, "fresh": fresh or output, "env": env}


def commands(out: Path, size: str) -> list[dict]:
    """The check, in order: the environment, the pytest ``cuda`` tests, then the project's own commands."""
    py, config = sys.executable, SIZES[size][0]
    data = [f"data.{s}.root={out / 'shapes'}" for s in ("train", "val")] + SIZES[size][2]
    # 20 iterations, a log row every 5: the 4 steps between log steps run under train.sync_debug
    train = ["train.device=cuda", "train.max_iter=20", "train.batch_size=16", "train.log_period=5"]
    train += ["train.eval_period=1000000", "train.checkpoint_period=1000000", "train.tensorboard=false"]

    def ssd_train(name: str, *options: str) -> dict:
        run = out / "runs" / name
        argv = [py, "-m", "ssd", "train", config, "--output-dir", str(run), *data, *train, *options]
        return command(f"train_{name}", argv, run / "metrics.jsonl", fresh=run)

    def ssd_eval(device: str, **env: str) -> dict:
        weights, result = out / "runs" / "fp16" / "last.pt", out / f"eval_{device}.json"
        argv = [py, "-m", "ssd", "eval", config, "--weights", str(weights), "--device", device]
        return command(f"eval_{device}", [*argv, "--json", str(result), *data, "train.amp=none"], result, **env)

    shapes = ["--out", str(out / "shapes"), "--train", "64", "--val", "16", "--size", str(SIZES[size][1])]
    pytest = ["-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    bench = ["--device", "cuda", "--only", "train_step", "predict", "train_loop", "--repeats", "5"]
    return [
        command("environment", [py, "-c", ENVIRONMENT, str(out / "environment.json")], out / "environment.json"),
        command("pytest_cuda", [py, "-m", "pytest", *pytest], SSD_CUDA_SIZE=size),
        command("data", [py, "-m", "ssd", "data", "shapes", *shapes, "--seed", "0"], fresh=out / "shapes"),
        ssd_train("fp16", "train.amp=fp16", "train.channels_last=true"),
        ssd_train("bf16", "train.amp=bf16"),
        ssd_train("compile", "train.amp=fp16", "train.channels_last=true", "train.compile=true"),
        ssd_train("sync_debug", "train.amp=fp16", "train.sync_debug=true"),
        ssd_eval("cuda"),
        ssd_eval("cpu", CUDA_VISIBLE_DEVICES=""),  # the CUDA-trained checkpoint in a process that sees no GPU
        command("bench", [py, "-m", "ssd", "bench", *bench, "--json", str(out / "bench.json")], out / "bench.json"),
    ]


NAMES = [c["name"] for c in commands(Path("runs"), "tiny")]


def shown(cmd: dict) -> str:
    """The command as a shell line, its extra environment first."""
    env = [f"{k}={shlex.quote(v)}" for k, v in cmd["env"].items()]
    return " ".join([*env, shlex.join(cmd["argv"])])


def numbers(path: Path | None, tail: str) -> object:
    """What a command's JSON output says: the document itself, or for JSON lines (metrics.jsonl) each
    key's last value (the last loss, scale, images/s, the final mAP). pytest's counts from its tail."""
    if path is None:
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)
        return {k: int(n) for n, k in counts} or None
    if not path.exists():
        return None
    text = path.read_text()
    if path.suffix != ".jsonl":
        return json.loads(text, parse_constant=str)  # NaN and Infinity as strings: strict JSON in the record
    merged: dict = {}
    for line in filter(str.strip, text.splitlines()):
        merged.update(json.loads(line, parse_constant=str))
    return merged


def run(cmd: dict, rec: dict, out: Path, timeout: float) -> None:
    """Run one command in the repository root, its output to its log; fill in its record."""
    log = Path(rec["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    fresh = cmd["fresh"]  # never read a previous run's output as this one's
    if fresh is not None and fresh.is_dir():
        shutil.rmtree(fresh)
    elif fresh is not None:
        fresh.unlink(missing_ok=True)
    start = time.monotonic()
    with log.open("w") as f:
        try:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "SSD_CACHE_DIR": str(out / "cache"), **cmd["env"]}
            proc = subprocess.run(cmd["argv"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            rec.update(status="passed" if proc.returncode == 0 else "failed", exit_code=proc.returncode)
        except subprocess.TimeoutExpired:
            rec["status"] = "timed out"  # killed
        finally:  # also when interrupted: the record says how long it ran and what it printed
            rec["seconds"] = round(time.monotonic() - start, 1)
            rec["tail"] = log.read_text(errors="replace").splitlines()[-30:]
    try:
        rec["numbers"] = numbers(cmd["output"], "\n".join(rec["tail"][-3:]))
    except (OSError, ValueError) as e:  # e.g. a line cut short: the record still gets written
        rec["numbers"] = {"unreadable": f"{cmd['output']}: {e}"}


def write(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def stop(signum, frame):
    # a time limit's SIGTERM: subprocess.run kills the running command, its record says "interrupted"
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="output folder (default runs/gpu_check)")
    p.add_argument("--size", choices=list(SIZES), default="full", help="full: SSD300 (default); tiny: 128 px")
    p.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"run only these: {', '.join(NAMES)}")
    p.add_argument("--timeout", type=float, default=600, help="seconds a command may run (default 600)")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    cmds = [c for c in commands(out, args.size) if not args.only or c["name"] in args.only]
    if args.dry_run:
        print("\n".join(f"{c['name']}: {shown(c)}" for c in cmds))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    records = [{"name": c["name"], "command": shown(c), "status": "pending", "exit_code": None} for c in cmds]
    for rec in records:
        rec.update(seconds=None, numbers=None, tail=None, log=str(out / "logs" / f"{rec['name']}.log"))
    install = os.environ.get("GPU_CHECK_INSTALL", "not through gpu_check.sh")
    doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": argv or sys.argv[1:], "size": args.size}
    doc.update(install=install, finished=None, passed=None, commands=records)
    path = out / "gpu_check.json"
    write(path, doc)
    signal.signal(signal.SIGTERM, stop)
    for cmd, rec in zip(cmds, records, strict=True):
        if any(r["name"] == "environment" and r["status"] in ("failed", "timed out") for r in records):
            rec["status"] = "skipped"  # no GPU or a missing package: every later command needs them
            continue
        print(f"gpu_check: {rec['name']}: {rec['command']}", flush=True)
        rec["status"] = "running"
        write(path, doc)
        try:
            run(cmd, rec, out, args.timeout)
        except BaseException:  # Ctrl-C or SIGTERM: say where it stopped, then stop
            rec["status"] = "interrupted"
            write(path, doc)
            raise
        write(path, doc)
        print(f"gpu_check: {rec['name']} {rec['status']} in {rec['seconds']} s", flush=True)
    doc.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), passed=all(r["status"] == "passed" for r in records))
    write(path, doc)
    for r in records:
        last = (r["tail"] or [""])[-1] if r["status"] != "passed" else ""
        print(f"{r['name']:<18} {r['status']:<10} {r['seconds'] or 0:>7.1f} s  {last[:80]}")
    print(f"{'passed' if doc['passed'] else 'FAILED'}: {path}")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
