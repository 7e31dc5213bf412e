"""The CUDA paths, in pytest: fp16 + GradScaler + channels_last, bf16, ``train.compile``, a GradScaler
overflow, ``train.sync_debug``, resume on the GPU, a CUDA checkpoint on the CPU, ``ssd eval`` on the GPU
against the CPU, and with 2+ GPUs a 2-process NCCL run (SyncBatchNorm, precise BN, loader workers).

Marked ``cuda`` and skipped without a GPU (``pytest -m cuda tests/test_cuda.py`` runs them on one;
``scripts/gpu_check.py`` runs them among its commands, docs/gpu.md). ``SSD_CUDA_SIZE`` sizes the model:
``tiny`` (the default) is conftest's ``tiny_config`` SSD (128 px, width 1/8), ``full`` the SSD300; both
have BN in every block and train on 40 shapes images, batch 8, from the same random weights
(``model.init``), so "the parameters moved" can be checked. The one test not marked ``cuda`` runs the
shared helpers' path on the CPU (tiny size only).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_EXTRAS, launch_ranks

import ssd.engine.train as engine
from ssd.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from ssd.cli import main
from ssd.config import Config, from_dict
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.device import full_fp32
from ssd.engine.train import train
from ssd.model import build_ssd

# the model by SSD_CUDA_SIZE: tiny is conftest.tiny_config's; both with BN everywhere (SyncBatchNorm has work)
MODELS = {"tiny": {"input_size": 128, "width": 0.125, "extras": TINY_EXTRAS}, "full": {"input_size": 300}}
SIZE_NAME = os.environ.get("SSD_CUDA_SIZE", "tiny")
if SIZE_NAME not in MODELS:
    raise ValueError(f"SSD_CUDA_SIZE={SIZE_NAME!r}: expected tiny or full")
SIZE = MODELS[SIZE_NAME]["input_size"]
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TWO_GPUS = [pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs")]
ON_THE_CPU = pytest.mark.skipif(SIZE_NAME == "full", reason="SSD_CUDA_SIZE=full: minutes on a CPU")

pytestmark = pytest.mark.usefixtures("one_thread")


def on_cuda(test):
    """Mark ``test`` ``cuda`` and skip it without a GPU."""
    for mark in CUDA:
        test = mark(test)
    return test


def on_two_gpus(test):
    for mark in TWO_GPUS:
        test = mark(test)
    return test


def run_dict(root: Path, init: Path | None, device: str = "cuda", **train_options) -> dict:
    dataset = {"format": "voc", "root": str(root), "classes": SHAPES_CLASSES}
    model = {"num_classes": len(SHAPES_CLASSES) + 1, "batch_norm": "all", "dropout": 0.0, **MODELS[SIZE_NAME]}
    return {
        "model": {**model, "init": str(init) if init else None},
        "data": {"train": {**dataset, "split": "train"}, "val": {**dataset, "split": "val"}, "num_workers": 0},
        "train": {
            "max_iter": 8,
            "batch_size": 8,
            "optimizer": "adamw",
            "lr": 1e-3,
            "schedule": "cosine",
            "warmup_iters": 2,
            "device": device,
            "checkpoint_period": 4,
            "eval_period": 100,
            "log_period": 1,
            "tensorboard": False,
            **train_options,
        },
        "eval": {"batch_size": 10},
    }


def config(root: Path, init: Path | None, device: str = "cuda", **train_options) -> Config:
    return from_dict(Config, run_dict(root, init, device, **train_options))


def loss_rows(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def parameter_names(root: Path) -> list[str]:
    return [n for n, _ in build_ssd(config(root, None).model).named_parameters()]


def scale_drops(rows: list[dict]) -> list[int]:
    """Iterations whose logged GradScaler scale is below the one before (65536 at the start)."""
    scales = [65536.0] + [r["grad_scale"] for r in rows]
    return [r["iter"] for r, (before, now) in zip(rows, itertools.pairwise(scales), strict=True) if now < before]


def assert_trained(out: Path, init_state: dict, names: list[str], iterations: int) -> list[dict]:
    """Every iteration logged with a finite loss, a step skipped only where an fp16 overflow halved the
    GradScaler's scale, every parameter moved away from ``init_state``, and last.pt's conv weights
    channels_last. Returns the loss rows."""
    rows = loss_rows(out)
    assert [r["iter"] for r in rows] == list(range(1, iterations + 1))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loc"], r["conf"]])).all() for r in rows)
    overflows = scale_drops(rows) if "grad_scale" in rows[0] else []
    assert {r["iter"] for r in rows if r["skipped"]} <= set(overflows)
    state = load_checkpoint(out / "last.pt")["model"]
    assert [n for n in names if torch.equal(state[n], init_state[n])] == []
    convs = [v for v in state.values() if v.ndim == 4]
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    # the 3x3 kernels are only channels_last (a 1x1 kernel is both layouts at once)
    assert sum(not v.is_contiguous() for v in convs) > 10
    return rows


tf32_off = full_fp32


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """40 train + 10 val images at the model's side, and init.pt: the random weights every run starts from.
    Read only."""
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, 40, 10, size=SIZE, seed=3)
    model_cfg = config(out, None).model
    torch.manual_seed(0)
    ckpt = make_checkpoint(build_ssd(model_cfg).state_dict(), model_cfg, SHAPES_CLASSES, "train")
    save_checkpoint(ckpt, out / "init.pt")
    return out


@pytest.fixture(scope="module")
def fp16_run(shapes, tmp_path_factory) -> Path:
    """8 iterations of fp16 autocast + GradScaler + channels_last on the GPU. Read only."""
    out = tmp_path_factory.mktemp("fp16") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(out.parent / "cache"))
        train(config(shapes, shapes / "init.pt", amp="fp16", channels_last="true"), out)
    return out


# --- training ------------------------------------------------------------------------------------


@on_cuda
def test_an_fp32_matmul_on_the_gpu_gives_the_cpu_s():
    """The GPU is there and computes: with TF32 off, an fp32 product agrees with the CPU's."""
    a, b = (torch.randn(512, 512, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1))
    with tf32_off():
        torch.testing.assert_close((a.cuda() @ b.cuda()).cpu(), a @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=ON_THE_CPU), pytest.param("cuda", marks=CUDA)])
def test_a_short_run_moves_every_parameter_and_keeps_channels_last(shapes, device, tmp_path):
    """fp16 + channels_last on CUDA (the GradScaler's scale logged at every row); on the CPU the same
    config trains in fp32, channels_last by ``auto``, with no scale to log."""
    init = load_checkpoint(shapes / "init.pt")["model"]
    train(config(shapes, shapes / "init.pt", device, amp="fp16", max_iter=4), tmp_path / "run")
    rows = assert_trained(tmp_path / "run", init, parameter_names(shapes), 4)
    assert all(("grad_scale" in r) == (device == "cuda") for r in rows)


@on_cuda
def test_fp16_channels_last_logs_a_settled_grad_scale(shapes, fp16_run):
    init = load_checkpoint(shapes / "init.pt")["model"]
    rows = assert_trained(fp16_run, init, parameter_names(shapes), 8)
    scales = [r["grad_scale"] for r in rows]
    assert all(0 < s <= 65536.0 for s in scales)
    # growth_interval 2000: in 8 steps the scale can only fall
    assert scales == sorted(scales, reverse=True)


@on_cuda
def test_bf16_trains_without_a_grad_scaler(shapes, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    init = load_checkpoint(shapes / "init.pt")["model"]
    train(config(shapes, shapes / "init.pt", amp="bf16"), tmp_path / "run")
    rows = assert_trained(tmp_path / "run", init, parameter_names(shapes), 8)
    assert not any("grad_scale" in r for r in rows)


@on_cuda
def test_compile_trains_and_its_first_loss_is_eager_s(shapes, fp16_run, tmp_path):
    """The same weights and the same first batch: the compiled forward gives eager's first loss."""
    init = load_checkpoint(shapes / "init.pt")["model"]
    cfg = config(shapes, shapes / "init.pt", amp="fp16", channels_last="true", compile=True)
    train(cfg, tmp_path / "run")
    rows = assert_trained(tmp_path / "run", init, parameter_names(shapes), 8)
    assert rows[0]["loss"] == pytest.approx(loss_rows(fp16_run)[0]["loss"], rel=1e-2)


@on_cuda
def test_a_grad_scaler_overflow_skips_exactly_that_update(shapes, tmp_path, monkeypatch):
    """A loss 1e6 times too large at iteration 3 overflows the fp16 gradients: the scale halves there,
    and every halving is one update AdamW did not take (its step count), the forced one included."""
    real_build_loss = engine.build_loss

    def build_loss(loss_cfg, model_cfg):
        criterion, calls = real_build_loss(loss_cfg, model_cfg), []

        def huge_at_3(*args):
            calls.append(None)
            losses = criterion(*args)
            if len(calls) == 3:
                losses = {"loc": losses["loc"] * 1e6, "conf": losses["conf"] * 1e6}
            return losses

        return huge_at_3

    monkeypatch.setattr(engine, "build_loss", build_loss)
    train(config(shapes, shapes / "init.pt", amp="fp16"), tmp_path / "run")
    rows = loss_rows(tmp_path / "run")
    halvings = scale_drops(rows)
    assert 3 in halvings and rows[2]["grad_scale"] == rows[1]["grad_scale"] / 2
    optimizer = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in optimizer.values()} == {8 - len(halvings)}


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@on_cuda
def test_sync_debug_finds_no_synchronisation_in_steady_steps(shapes, tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = config(shapes, shapes / "init.pt", amp=amp, sync_debug=True, log_period=4, max_iter=12)
    assert train(cfg, tmp_path / "run")["stopped"] == "done"
    assert [r["iter"] for r in loss_rows(tmp_path / "run")] == [4, 8, 12]
    assert torch.cuda.get_sync_debug_mode() == 0  # left as it was


@on_cuda
def test_sync_debug_catches_a_synchronisation(shapes, tmp_path, monkeypatch):
    """The control for the test above: a ``.item()`` in the loss at iteration 6 (steady state) raises."""
    real_build_loss = engine.build_loss

    def build_loss(loss_cfg, model_cfg):
        criterion, calls = real_build_loss(loss_cfg, model_cfg), []

        def syncing_at_6(*args):
            calls.append(None)
            losses = criterion(*args)
            if len(calls) == 6:
                losses["loc"].item()
            return losses

        return syncing_at_6

    monkeypatch.setattr(engine, "build_loss", build_loss)
    cfg = config(shapes, shapes / "init.pt", sync_debug=True, log_period=4, max_iter=12)
    with pytest.raises(RuntimeError, match="synchroniz"):
        train(cfg, tmp_path / "run")
    torch.cuda.set_sync_debug_mode("default")


@on_cuda
def test_resume_on_cuda_follows_the_uninterrupted_run(shapes, tmp_path, stop_training_at):
    """Deterministic kernels: 8 iterations stopped by an error in the 5th (last.pt at 4), then --resume
    with the same settings, give the losses, scales and weights of 8 in one go."""

    def cfg(max_iter):
        options = {"schedule": "multistep", "steps": [1000], "deterministic": True, "max_iter": max_iter}
        return config(shapes, shapes / "init.pt", amp="fp16", **options)  # checkpoint_period 4: last.pt at 4

    try:
        train(cfg(8), tmp_path / "straight")
        stop_training_at(5)
        with pytest.raises(RuntimeError, match="stopped in iteration 5"):
            train(cfg(8), tmp_path / "resumed")
        stop_training_at(None)
        assert load_checkpoint(tmp_path / "resumed" / "last.pt")["iteration"] == 4
        train(cfg(8), tmp_path / "resumed", resume=True)
    finally:  # train.deterministic switches torch's global flags on
        torch.use_deterministic_algorithms(False)
    straight, resumed = (loss_rows(tmp_path / "straight"), loss_rows(tmp_path / "resumed"))
    assert [r["iter"] for r in resumed] == list(range(1, 9))
    for key in ("loss", "loc", "conf", "grad_scale"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in straight], rel=1e-3), key
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-3, atol=1e-4, msg=name)


# --- a CUDA checkpoint elsewhere -------------------------------------------------------------------


@on_cuda
def test_a_cuda_checkpoint_predicts_the_same_on_the_cpu(fp16_run):
    ckpt = load_checkpoint(fp16_run / "last.pt")
    assert {v.device.type for v in ckpt["model"].values()} == {"cpu"}
    cpu_model, _ = model_from_checkpoint(fp16_run / "last.pt")
    gpu_model, _ = model_from_checkpoint(fp16_run / "last.pt")
    gpu_model.cuda().eval()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tf32_off():
        on_cpu, on_gpu = cpu_model.eval()(x), gpu_model(x.cuda())
    for key in ("loc", "conf"):
        torch.testing.assert_close(on_gpu[key].cpu(), on_cpu[key], rtol=1e-3, atol=1e-4, msg=key)


@on_cuda
def test_ssd_eval_on_cuda_gives_the_cpu_map(shapes, fp16_run, tmp_path):
    """fp32 on both (train.amp=none, TF32 off): the same VOC07 mAP and per-class APs to 1e-4."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(shapes, None)))
    results, top_scores = {}, {}
    with tf32_off():
        for device in ("cuda", "cpu"):
            out = tmp_path / device
            args = ["eval", str(cfg), "--weights", str(fp16_run / "last.pt"), "--device", device]
            args += ["--json", str(out / "m.json"), "--out-dir", str(out), "train.amp=none"]
            assert main(args) == 0
            results[device] = json.loads((out / "m.json").read_text())
            top_scores[device] = top_scores_per_image(out / "detections.json")
    assert results["cuda"]["map"] == pytest.approx(results["cpu"]["map"], abs=1e-4)
    assert results["cuda"]["per_class"] == pytest.approx(results["cpu"]["per_class"], abs=1e-4)
    # a barely trained model's mAP is near 0: the detections themselves are the stronger comparison
    assert top_scores["cuda"].keys() == top_scores["cpu"].keys()
    for image, scores in top_scores["cpu"].items():
        assert top_scores["cuda"][image] == pytest.approx(scores, abs=1e-4), image


def top_scores_per_image(detections: Path, top: int = 10) -> dict[str, list[float]]:
    per_image = {}
    for d in json.loads(detections.read_text()):
        per_image.setdefault(d["image_id"], []).append(d["score"])
    return {k: sorted(v, reverse=True)[:top] for k, v in per_image.items()}


@on_cuda
def test_train_device_cuda_index_trains_there(shapes, tmp_path):
    # the last GPU: not the default one where there are several
    device = torch.cuda.device_count() - 1
    cfg = config(shapes, shapes / "init.pt", device=f"cuda:{device}", max_iter=2)
    assert train(cfg, tmp_path / "run")["iteration"] == 2


# --- several GPUs ----------------------------------------------------------------------------------


def launch_train(tmp_path: Path, shapes: Path, overrides: list[str]) -> list:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(shapes, None, max_iter=6, eval_period=3)))
    command = ["-m", "ssd", "train", str(cfg), "--output-dir", str(tmp_path / "run"), *overrides]
    return launch_ranks(2, command, tmp_path)


@on_two_gpus
def test_two_ranks_on_nccl_with_sync_bn_and_precise_bn(shapes, tmp_path):
    overrides = ["train.bn=sync", "train.precise_bn_batches=2", "train.precise_bn_before_eval=true"]
    results = launch_train(tmp_path, shapes, [*overrides, "data.num_workers=2"])
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:]
    assert "precise BN at iteration 3" in results[0].stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "map" in r] == [3, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert variances and all(torch.isfinite(v).all() for v in variances)


@on_two_gpus
def test_two_ranks_refuse_one_fixed_gpu(shapes, tmp_path):
    """``train.device=cuda:0`` under torchrun would put both ranks on GPU 0: exit 2, naming the key."""
    results = launch_train(tmp_path, shapes, ["train.device=cuda:0"])
    assert [r.returncode for r in results] == [2, 2]
    assert "train.device cuda:0" in results[0].stdout
