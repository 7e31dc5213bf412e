"""scripts/gpu_check.py without a GPU: the step record it writes as it goes, its table, the rules it
judges a GPU run's metrics by, and a run on this machine that says it has no CUDA device.

The GPU steps themselves need a GPU (docs/gpu.md); ``--cpu`` rehearses them on a tiny model, and one
test here runs its first training step that way."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """scripts/gpu_check.py as a module (it puts scripts/ on sys.path for its package, scripts/gpucheck/,
    and re-exports the names tested here)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


def strict_json(path: Path):
    """The file as strict JSON (no NaN / Infinity tokens, which some readers refuse)."""

    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_each_step_is_on_disk_when_it_starts_and_when_it_ends(gpu_check, tmp_path):
    path = tmp_path / "gpu_check.json"
    report = gpu_check.Report(path, {"argv": []})
    seen_while_running = []

    def fine():
        seen_while_running.append(strict_json(path)["steps"])
        return {"loss": 1.5, "bad": math.nan, "summary": "all good"}

    def check_fails():
        raise gpu_check.Failed("scale fell at 12", {"grad_scale_last": 2.0})

    def crashes():
        return 1 / 0

    def cannot_run():
        raise gpu_check.Skipped("1 GPU here")

    for name, fn in [("a", fine), ("b", check_fails), ("c", crashes), ("d", cannot_run)]:
        report.run(name, fn)
    report.skip("e", "no CUDA device")

    assert [(r["name"], r["status"]) for r in seen_while_running[0]] == [("a", "running")]
    steps = strict_json(path)["steps"]
    assert [r["status"] for r in steps] == ["ok", "failed", "failed", "skipped", "skipped"]
    assert [r["ok"] for r in steps] == [True, False, False, None, None]
    assert steps[0]["summary"] == "all good" and steps[0]["numbers"] == {"loss": 1.5, "bad": "nan"}
    assert steps[1]["numbers"] == {"grad_scale_last": 2.0} and steps[1]["error"] == "scale fell at 12"
    assert steps[2]["error"] == "ZeroDivisionError: division by zero" and "1 / 0" in steps[2]["traceback"]
    assert [r["error"] for r in steps[3:]] == ["1 GPU here", "no CUDA device"]
    assert report.failed

    table = report.table().splitlines()
    assert table[0].split() == ["step", "result", "seconds", "summary"]
    assert table[1].split()[:2] == ["a", "ok"] and table[1].endswith("all good")
    assert table[4].split()[:2] == ["d", "skipped"] and table[4].endswith("1 GPU here")
    assert table[6].startswith("1 ok, 2 failed, 2 skipped in ")
    assert "b failed: scale fell at 12" in table and "c failed: ZeroDivisionError: division by zero" in table


def test_an_interrupted_step_is_recorded_before_the_interrupt_goes_on(gpu_check, tmp_path):
    report = gpu_check.Report(tmp_path / "gpu_check.json", {})

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report.run("fp16_channels_last", killed)
    (step,) = strict_json(tmp_path / "gpu_check.json")["steps"]
    assert (step["status"], step["ok"]) == ("interrupted", False)


def fp16_rows(scales: list[float], skipped: dict[int, int] | None = None) -> list[dict]:
    skipped = skipped or {}
    return [
        {
            "iter": i,
            "loss": 20.0 - i / 10,
            "loc": 5.0,
            "conf": 15.0 - i / 10,
            "skipped": skipped.get(i, 0),
            "grad_scale": s,
        }
        for i, s in enumerate(scales, start=1)
    ]


def test_the_grad_scale_may_fall_in_the_first_steps_only(gpu_check):
    analyse = gpu_check.analyse_rows
    settled = [32768.0, 16384.0] + [16384.0] * 10
    numbers, problems = analyse(fp16_rows(settled, {1: 1, 2: 1}), list(range(1, 13)), scaler=True)
    assert problems == [] and numbers["scale_drops_at"] == [1, 2] and numbers["skipped"] == 2
    assert (numbers["grad_scale_first"], numbers["grad_scale_last"], numbers["loss_last"]) == (32768.0, 16384.0, 18.8)

    late = [65536.0] * 11 + [32768.0]
    _, problems = analyse(fp16_rows(late, {12: 1}), list(range(1, 13)), scaler=True)
    assert problems == [
        "the GradScaler scale fell at iteration(s) 12, after the first 10",
        "steps skipped at iteration(s) 12, after the first 10",
    ]


def test_missing_rows_non_finite_losses_and_old_engines_are_named(gpu_check):
    analyse = gpu_check.analyse_rows
    rows = fp16_rows([65536.0] * 6)
    rows[2]["loss"] = math.nan
    del rows[4]
    _, problems = analyse(rows, list(range(1, 7)), scaler=True)
    assert problems == ["logged iterations 1..4, 6, expected 1..6", "non-finite loss at iteration(s) 3"]

    skipped_window = fp16_rows([65536.0] * 3, {2: 1})
    # every step of the window skipped: no loss logged
    skipped_window[1].update(loss=None, loc=None, conf=None)
    assert analyse(skipped_window, [1, 2, 3], scaler=True)[1] == []
    assert analyse(skipped_window, [1, 2, 3], scaler=False)[1] == ["steps skipped at iteration(s) 2"]

    old = [{k: v for k, v in r.items() if k not in ("skipped", "grad_scale")} for r in fp16_rows([1.0] * 2)]
    assert analyse(old, [1, 2], scaler=True)[1] == [
        "metrics.jsonl rows have no 'skipped' count (an engine older than this check)",
        "metrics.jsonl rows have no grad_scale (an engine older than this check)",
    ]


def test_layout_and_parameter_change_of_real_state_dicts(gpu_check):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # a 1x1 kernel is both layouts at once
    assert gpu_check.channels_last_report(before) == {
        "tensors_4d": 2,
        "channels_last": 1,
        "only_channels_last": 0,
        "not_channels_last": ["0.weight"],
    }
    net.to(memory_format=torch.channels_last)
    with torch.no_grad():
        net[0].weight.add_(0.01)
    after = net.state_dict()
    assert gpu_check.channels_last_report(after)["only_channels_last"] == 1
    change = gpu_check.parameter_change(before, after, ["0.weight", "0.bias", "1.weight"])
    assert (change["changed"], change["unchanged"]) == (1, ["0.bias", "1.weight"])


def test_gpu_and_cpu_evaluations_are_compared_by_map_and_by_top_scores(gpu_check):
    def result(map_, scores):
        dets = [{"image_id": image, "score": s} for image, ss in scores.items() for s in ss]
        return {"map": map_, "per_class": {"circle": map_, "star": None}, "dets": dets}

    a = result(0.25, {"x": [0.9, 0.5, 0.1], "y": [0.3]})
    b = result(0.25004, {"x": [0.5, 0.90001, 0.1], "y": [0.3, 0.2]})
    numbers = gpu_check.compare_evals(a, b)
    assert numbers["map_diff"] == pytest.approx(4e-5) and numbers["per_class_max_diff"] == pytest.approx(4e-5)
    assert numbers["top_score_max_diff"] == pytest.approx(1e-5)
    assert (numbers["detections"], numbers["images_with_other_counts"]) == ([4, 5], 1)


def test_a_failed_command_is_reported_by_its_error_line_and_frame(gpu_check, tmp_path):
    log = tmp_path / "x.log"
    frame = f'  File "{gpu_check.REPO}/ssd/engine/step.py", line 91, in __call__'
    log.write_text(
        f"INFO iter 10/30\nTraceback (most recent call last):\n{frame}\n    x.item()\n"
        '  File "/usr/lib/python3/torch/x.py", line 3, in f\n'
        "RuntimeError: called a synchronizing CUDA operation\n"
    )
    assert gpu_check.log_error(log) == "RuntimeError: called a synchronizing CUDA operation at ssd/engine/step.py:91"
    log.write_text("ssd train: error: train.sync_debug: unknown key\n")
    assert gpu_check.log_error(log) == "ssd train: error: train.sync_debug: unknown key"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_check_says_so_and_fails(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 1, out.stderr
    assert "gpu_check: no CUDA device; the GPU steps are skipped" in out.stdout
    steps = strict_json(tmp_path / "gpu_check.json")["steps"]
    assert [(r["name"], r["status"]) for r in steps[:2]] == [("environment", "ok"), ("cuda", "failed")]
    assert steps[1]["error"].startswith("no CUDA device: torch ")
    assert {r["status"] for r in steps[2:]} == {"skipped"} and {r["error"] for r in steps[2:]} == {"no CUDA device"}
    assert [r["name"] for r in steps] == [
        "environment",
        "cuda",
        "data",
        "fp16_channels_last",
        "bf16",
        "resume",
        "cpu_load",
        "eval_gpu_vs_cpu",
        "sync_debug",
        "compile",
        "bench",
        "nccl_2gpu",
    ]
    assert out.stdout.rstrip().endswith("cuda failed: " + steps[1]["error"])


def test_the_cpu_rehearsal_trains_through_the_real_commands(gpu_check, tmp_path, monkeypatch, capsys):
    """``--cpu``: the fp16 step's own commands and checks on a tiny model, in a few seconds."""
    monkeypatch.setenv("SSD_CACHE_DIR", str(tmp_path / "cache"))
    code = gpu_check.main(["--cpu", "--iters", "2", "--only", "fp16_channels_last", "--out", str(tmp_path)])
    steps = {r["name"]: r for r in strict_json(tmp_path / "gpu_check.json")["steps"]}
    assert code == 0, capsys.readouterr().out
    assert [steps[n]["status"] for n in ("environment", "cuda", "data", "fp16_channels_last")] == [
        "ok",
        "skipped",
        "ok",
        "ok",
    ]
    numbers = steps["fp16_channels_last"]["numbers"]
    assert numbers["iterations"] == 2 and numbers["skipped"] == 0
    assert numbers["parameters_changed"]["changed"] == numbers["parameters_changed"]["parameters"] > 0
    assert numbers["weights"]["channels_last"] == numbers["weights"]["tensors_4d"]
    assert (tmp_path / "logs" / "fp16.log").exists() and (tmp_path / "runs" / "fp16" / "last.pt").exists()


def test_bench_rows_are_summarised_with_or_without_a_peer(gpu_check):
    row = {"name": "train_step_fp16", "ours_s": 0.0123, "peer_s": 0.0172, "speedup": 1.4}
    assert gpu_check.bench_cell(row) == "train_step_fp16 12.3 ms (1.40x)"
    row = {"name": "train_loop", "ours_s": 0.0005, "peer_s": None, "speedup": None, "mfu": 0.31}
    assert gpu_check.bench_cell(row) == "train_loop 0.5 ms (MFU 31.0%)"
