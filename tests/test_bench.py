"""The bench rows' checks and plumbing (``ssd bench``), at small sizes: nothing here asserts a speed."""

from __future__ import annotations

import json

import pytest
import torch

from ssd.bench import main
from ssd.bench.cuda import loop_images_per_s, peak_bf16_tflops, train_tflops
from ssd.bench.loader import bench_loader, check_boxes
from ssd.bench.timing import interleaved, paired_speedup
from ssd.bench.train import (
    RepeatableStep,
    check_equivalence,
    check_step,
    formats_note,
    step_row,
    time_steps,
    train_batch,
)
from ssd.loss import MultiBoxLoss
from ssd.model import build_ssd


def test_loss_row_equals_torchvision_to_1e5_and_the_json_keeps_its_extra_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--only", "loss", "--repeats", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["name"] == "loss"
    assert 0.0 <= row["max_abs_diff"] <= 1e-5
    # the median of 20 paired per-round ratios (at least 20 rounds whatever --repeats): the same quantity as the
    # ratio of the two medians, up to the machine's drift
    assert row["rounds"] == 20
    assert 0.5 < row["speedup"] / (row["peer_s"] / row["ours_s"]) < 2.0
    assert "loss" in capsys.readouterr().out


def test_loader_row_reads_the_same_files_into_valid_uint8_batches_on_both_sides():
    # 14 images in batches of 4: both loaders drop the last partial batch, 12 images an epoch
    row = bench_loader(1, num_images=14, batch_size=4, num_workers=2)
    assert row["images_per_epoch"] == 12
    assert row["batch"] == 4 and row["num_workers"] == 2
    assert row["ours_images_per_s"] == pytest.approx(1 / row["ours_s"])
    assert row["peer_images_per_s"] > 0
    assert isinstance(row["ours_batch_nhwc"], bool)


def test_loader_box_check_rejects_boxes_outside_the_image_or_empty():
    check_boxes(torch.tensor([[0.0, 0.1, 1.0, 0.5]]), "ok")
    with pytest.raises(AssertionError, match="outside"):
        check_boxes(torch.tensor([[0.0, 0.1, 1.01, 0.5]]), "x")
    with pytest.raises(AssertionError, match="empty"):
        check_boxes(torch.tensor([[0.3, 0.1, 0.3, 0.5]]), "x")


def test_train_batch_is_nhwc_uint8_with_both_kinds_of_targets():
    batch = train_batch(2)
    images = batch["images"]
    assert images.shape == (2, 3, 300, 300) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    for i, t in enumerate(batch["targets"]):
        n = len(t["labels"])
        torch.testing.assert_close(batch["gt_boxes"][i, :n], t["boxes"] / 300)
        assert torch.equal(batch["gt_labels"][i, :n], t["labels"]) and (batch["gt_labels"][i, n:] == 0).all()


@pytest.mark.numerics
def test_our_training_step_equals_torchvisions_on_its_weights(tv_ssd300):
    diffs = check_equivalence(train_batch(1, seed=1), tv_ssd300)
    assert diffs["preprocess_max_abs_diff"] <= 1e-4
    assert diffs["loss_max_abs_diff"] <= 1e-5
    assert diffs["update_max_rel_diff"] <= 1e-4


def tiny_step(make_tiny_config, lr: float, scale: float = 1.0) -> RepeatableStep:
    """A tiny SSD's training step on 2 random images with one box each (``scale`` multiplies the loss)."""
    torch.manual_seed(0)
    model = build_ssd(make_tiny_config(num_classes=3, dropout=0.0)).train()
    criterion = MultiBoxLoss()
    images = torch.randn(2, 3, 128, 128)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5]], [[0.3, 0.2, 0.9, 0.9]]])
    labels = torch.tensor([[1], [2]])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def losses():
        out = criterion(model(images), boxes, labels, model.priors)
        return {k: v * scale for k, v in out.items()}

    return RepeatableStep(model, optimizer, losses)


def test_step_check_passes_a_real_step_and_reset_restores_the_weights(make_tiny_config):
    step = tiny_step(make_tiny_config, lr=1e-3)
    first = check_step(step, "tiny")
    assert set(first) == {"loc", "conf"}
    step.reset()
    assert all(torch.equal(p, p0) for p, p0 in zip(step.model.parameters(), step.initial, strict=True))
    # the same weights, the same inputs: the same losses
    again = check_step(step, "tiny")
    assert again == pytest.approx(first, rel=1e-6)


def test_timed_steps_start_from_the_same_weights_and_the_row_takes_the_faster_peer(make_tiny_config):
    steps = {name: tiny_step(make_tiny_config, lr=1e-3) for name in ("a", "b")}
    first = {name: s.step() for name, s in steps.items()}
    times = time_steps(steps, 2)
    assert set(times) == {"a", "b"}
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    for name, s in steps.items():  # reset before each timed step: still one step from the start
        s.reset()
        torch.testing.assert_close(s.step(), first[name])
    # seconds per step of 8 in three rounds; the machine slows down in round 2 for both sides
    times = {
        "ours": [8.0, 16.0, 9.6],
        "ours_nchw": [10.4, 20.8, 11.0],
        "peer_nchw": [12.0, 24.0, 13.0],
        "peer_channels_last": [9.6, 20.8, 12.8],
        "ours_all_layers": [8.8, 17.6, 9.0],
        "peer_all_layers": [10.0, 20.0, 10.4],
    }
    row = step_row("train_step", times, 8, 1.15)
    # per image, the fastest step of each
    assert row["ours_s"] == 1.0 and row["peer_s"] == 1.2
    assert row["peer"].endswith("channels_last")
    assert row["ours_nchw_s"] == 1.3 and row["peer_nchw_s"] == 1.5
    # speedup: median of the paired ratios 1.2, 1.3, 1.333; the fastest steps' ratio beside it
    assert row["speedup"] == pytest.approx(1.3)
    assert row["fastest_ratio"] == pytest.approx(1.2) and row["rounds"] == 3
    assert "median of 3 paired per-round ratios (fastest steps: 1.20x)" in formats_note(row)


def test_interleaved_rounds_alternate_the_order_and_run_before_right_before_each_call():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    before = {"b": lambda: calls.append("reset b")}
    times = interleaved(fns, 3, before)
    assert calls == ["a", "reset b", "b", "c", "c", "reset b", "b", "a", "a", "reset b", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_paired_speedup_is_the_median_of_round_ratios_and_needs_paired_rounds():
    # ratios 1.1, 1.2, 1.3, 1.25: the median of four is the mean of the middle two
    assert paired_speedup([1.0, 2.0, 1.0, 1.0], [1.1, 2.4, 1.3, 1.25]) == pytest.approx(1.225)
    with pytest.raises(ValueError):
        paired_speedup([1.0, 2.0], [1.0])


def test_step_check_fails_when_the_step_changes_nothing(make_tiny_config):
    with pytest.raises(AssertionError, match="unchanged"):
        check_step(tiny_step(make_tiny_config, lr=0.0), "lr 0")


def test_step_check_fails_on_a_non_finite_loss(make_tiny_config):
    with pytest.raises(AssertionError, match="non-finite"):
        check_step(tiny_step(make_tiny_config, lr=1e-3, scale=float("nan")), "nan")


def test_gpu_peak_table_and_model_flops():
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") is None
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None
    # 3 forwards of 69.7 GFLOP each
    assert train_tflops(1000.0) == pytest.approx(1000 * 3 * 69.7 / 1000)


def test_train_loop_rate_skips_the_warm_up_window(tmp_path):
    rows = [
        {"iter": 10, "loss": 9.0, "images_per_s": 100.0},  # warm-up: workers starting, cuDNN searching
        {"iter": 20, "loss": 8.0, "images_per_s": 800.0},
        {"iter": 30, "eval": "voc07", "map": 0.1},
        {"iter": 40, "loss": 7.0, "images_per_s": 400.0},  # 20 iterations since the last training row
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 10 iterations at 800/s and 20 at 400/s: 30 / (10 / 800 + 20 / 400)
    assert loop_images_per_s(path) == pytest.approx(30 / (10 / 800 + 20 / 400))
    with pytest.raises(ValueError, match="training rows"):
        loop_images_per_s(path, warmup_rows=3)


def test_cuda_rows_are_asked_for_with_device_cuda_and_fail_clearly_without_cuda(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "train_loop"])  # a GPU row, asked for on the CPU
    assert "not a cpu row" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--only", "predict"])
    assert "CUDA is not available" in capsys.readouterr().err
