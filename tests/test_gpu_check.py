"""scripts/gpu_check.py on the CPU: ``--dry-run`` prints the check's commands and runs and writes nothing,
every ``python -m ssd`` command is one the CLI takes (subcommand, options, config overrides), and a run
writes each command's record as it goes (with stand-in commands: the real ones need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import ssd.cli
from ssd.bench import main as bench_main
from ssd.config import load_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"
NAMES = ["environment", "pytest_cuda", "data", "train_fp16", "train_bf16", "train_compile", "train_sync_debug"]
NAMES += ["eval_cuda", "eval_cpu", "bench"]


@pytest.fixture
def gpu_check():
    """The script as a module (loaded by path: scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(*args: str) -> dict[str, list[str]]:
    """``python scripts/gpu_check.py --dry-run ARGS``: each printed command's argv by name, its
    environment assignments (``KEY=value`` before the interpreter) first."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [line.partition(": ") for line in out.stdout.splitlines()]
    return {name: shlex.split(command) for name, _, command in lines}


def test_the_dry_run_prints_every_command_and_runs_and_writes_nothing(gpu_check, tmp_path, monkeypatch, capsys):
    commands = dry_run("--out", str(tmp_path / "out"), "--size", "tiny")
    assert list(commands) == NAMES
    assert commands["pytest_cuda"][:5] == ["SSD_CUDA_SIZE=tiny", sys.executable, "-m", "pytest", "-m"]
    assert commands["eval_cpu"][0] == "CUDA_VISIBLE_DEVICES="
    assert dry_run("--only", "data", "bench").keys() == {"data", "bench"}

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run ran a command")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(NAMES)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_every_ssd_command_is_one_the_cli_takes(size, capsys):
    subcommands = set()
    for name, argv in dry_run("--size", size).items():
        argv = argv[argv.index(sys.executable) :]
        if argv[1:3] != ["-m", "ssd"]:
            continue
        args = ssd.cli.parse_args(ssd.cli.build_parser(), argv[3:])  # exits 2 on an unknown option
        subcommands.add((args.command, getattr(args, "data_command", None)))
        if args.command in ("train", "eval"):
            load_config(args.config, args.overrides)  # the config file and every override key
        if args.command == "bench":  # its own parser: --only's rows and --device are checked before --help
            with pytest.raises(SystemExit) as stopped:
                bench_main([*args.bench_args, "--help"])
            assert stopped.value.code == 0, name
    assert subcommands == {("data", "shapes"), ("train", None), ("eval", None), ("bench", None)}
    for command, sub in subcommands:
        with pytest.raises(SystemExit) as stopped:
            ssd.cli.main([command, *([sub] if sub else []), "--help"])
        assert stopped.value.code == 0, command
    capsys.readouterr()


def test_a_run_records_each_command_as_it_goes_and_stops_without_an_environment(gpu_check, tmp_path, monkeypatch):
    py, out = sys.executable, tmp_path / "out"
    result = out / "result.json"
    script = f"import json; json.dump({{'map': 0.5, 'loss': float('nan')}}, open({str(result)!r}, 'w'))"
    fake = [
        gpu_check.command("writes_json", [py, "-c", script], result),
        gpu_check.command("fails", [py, "-c", "print('1 passed, 2 skipped'); raise SystemExit(3)"]),
        gpu_check.command("environment", [py, "-c", "raise SystemExit('no CUDA device')"]),
        gpu_check.command("after", [py, "-c", "print('never')"]),
    ]
    monkeypatch.setattr(gpu_check, "commands", lambda out, size: fake)
    assert gpu_check.main(["--out", str(out)]) == 1
    doc = json.loads((out / "gpu_check.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    records = {r["name"]: r for r in doc["commands"]}
    assert [r["status"] for r in records.values()] == ["passed", "failed", "failed", "skipped"]
    assert records["writes_json"]["numbers"] == {"map": 0.5, "loss": "NaN"}
    assert (records["fails"]["exit_code"], records["fails"]["numbers"]) == (3, {"passed": 1, "skipped": 2})
    assert records["environment"]["tail"] == ["no CUDA device"]
    assert doc["passed"] is False and doc["finished"] and not (out / "logs" / "after.log").exists()
