"""ONNX export (``ssd export``): onnx.checker, onnxruntime vs PyTorch within 1e-4, dynamic batch, the
NMS variant against the PyTorch post-processor. Skipped only when the optional onnxruntime is absent."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ssd.checkpoint import checkpoint_model_config, make_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from ssd.cli import main  # noqa: E402
from ssd.config import PostprocessConfig  # noqa: E402
from ssd.data.transforms import normalize_batch  # noqa: E402
from ssd.export import export_onnx  # noqa: E402
from ssd.model import build_ssd  # noqa: E402
from ssd.ops.boxes import decode  # noqa: E402
from ssd.postprocess import PostProcessor  # noqa: E402

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py


@pytest.fixture(scope="module")
def bn_ckpt(tmp_path_factory, make_tiny_config) -> Path:
    """A tiny BN model in BGR with non-trivial BN statistics (channel order and folding both matter)."""
    cfg = make_tiny_config(
        batch_norm="all", num_classes=6, preprocess={"channel_order": "bgr", "mean": [0.4, 0.45, 0.5]}
    )
    torch.manual_seed(0)
    model = build_ssd(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.2)
        for m in [*model.head.conf, *model.head.loc]:  # logits and offsets O(1): scores spread, boxes inside
            m.weight.mul_(0.1)
    path = tmp_path_factory.mktemp("export") / "bn.pt"
    save_checkpoint(make_checkpoint(model.state_dict(), cfg, [f"c{i}" for i in range(1, 6)], "train"), path)
    return path


@pytest.fixture(scope="module")
def heads_ckpt(tmp_path_factory, make_tiny_config) -> Path:
    """A tiny model with BN in every block and in the heads (model.batch_norm [all, heads]), its running
    statistics measured on random images, the head BN's affine parameters away from the identity."""
    cfg = make_tiny_config(batch_norm=["all", "heads"], num_classes=6)
    torch.manual_seed(0)
    model = build_ssd(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average: population statistics of the batches below
        model.train()
        for seed in range(3):
            model(normalize_batch(images(4, seed=10 + seed).to(torch.uint8), cfg.preprocess))
        for kind, scale in (("loc", 0.3), ("conf", 1.5)):  # offsets O(0.3): boxes inside; logits O(1.5): scores spread
            for m in getattr(model.head, f"{kind}_bn"):
                m.weight.copy_(scale * (0.5 + torch.rand(m.num_features, generator=g)))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    path = tmp_path_factory.mktemp("export_heads") / "heads.pt"
    save_checkpoint(make_checkpoint(model.state_dict(), cfg, [f"c{i}" for i in range(1, 6)], "train"), path)
    return path


def images(batch: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """RGB 0..255 float images, the graph's input."""
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed)).float()


def reference(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised xyxy boxes and softmax scores from the unfused PyTorch model, written out independently."""
    model, ckpt = model_from_checkpoint(path)
    cfg = checkpoint_model_config(ckpt)
    with torch.no_grad():
        out = model.eval()(normalize_batch(x.to(torch.uint8), cfg.preprocess))
    boxes = decode(out["loc"], model.priors, tuple(cfg.priors.variances)).clamp(0, 1)
    return boxes, out["conf"].softmax(-1)


def run_onnx(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})]


def test_export_dynamic_batch_matches_pytorch(bn_ckpt, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(bn_ckpt), "--out", str(out), "--dynamic-batch", "--opset", "13"]) == 0
    assert "onnx.checker passed" in caplog.text and "21 BatchNorms folded" in caplog.text
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version == 13
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]  # folded
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == [
        "boxes",
        "scores",
    ]
    for batch in (1, 3):  # the batch dimension is dynamic
        x = images(batch, seed=batch)
        boxes, scores = run_onnx(out, x)
        ref_boxes, ref_scores = reference(bn_ckpt, x)
        assert boxes.shape == (batch, 1524, 4) and scores.shape == (batch, 1524, 6)
        assert (boxes - ref_boxes).abs().max() <= 1e-4
        assert (scores - ref_scores).abs().max() <= 1e-4
        torch.testing.assert_close(scores.sum(-1), torch.ones(batch, 1524))
        # informative
        assert ref_scores[..., 1:].max() > 0.3 and ((ref_boxes > 0) & (ref_boxes < 1)).float().mean() > 0.5


def test_static_export_without_folding_keeps_batchnorm_and_a_fixed_batch(bn_ckpt, tmp_path):
    out = tmp_path / "static.onnx"
    assert main(["export", "--weights", str(bn_ckpt), "--out", str(out), "--no-fuse"]) == 0
    graph = onnx.load(str(out))
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 128, 128]
    x = images(1, seed=7)
    boxes, scores = run_onnx(out, x)
    ref_boxes, ref_scores = reference(bn_ckpt, x)
    assert (boxes - ref_boxes).abs().max() <= 1e-4 and (scores - ref_scores).abs().max() <= 1e-4


def test_nms_variant_equals_the_pytorch_post_processor(bn_ckpt, tmp_path):
    """Where no cap binds (few detections per class), ONNX NMS selects what PostProcessor does."""
    model, ckpt = model_from_checkpoint(bn_ckpt)
    model.eval()
    cfg = checkpoint_model_config(ckpt)
    post_cfg = PostprocessConfig(score_threshold=0.5, nms_threshold=0.45, detections_per_image=200)
    out = tmp_path / "nms.onnx"
    export_onnx(model, cfg.preprocess, out, opset=17, dynamic_batch=True, nms=post_cfg)
    x = images(2, seed=3)
    det_boxes, det_scores, det_labels, det_batch = run_onnx(out, x)
    assert det_labels.dtype == torch.int64 and det_batch.dtype == torch.int64

    with torch.no_grad():
        raw = model(normalize_batch(x.to(torch.uint8), cfg.preprocess))
    post = PostProcessor(0.5, 0.45, topk_candidates=1524, detections_per_image=10**6)
    expected = post(raw, model.priors, (1, 1))  # input size 1 x 1: boxes stay normalised
    for b, exp in enumerate(expected):
        assert 10 < len(exp["scores"]) < 200 and exp["labels"].unique().numel() >= 2
        mine = det_batch == b
        assert int(mine.sum()) == len(exp["scores"])
        order = torch.argsort(det_scores[mine], descending=True)
        got_scores, got_labels, got_boxes = det_scores[mine][order], det_labels[mine][order], det_boxes[mine][order]
        torch.testing.assert_close(got_scores, exp["scores"], rtol=0, atol=1e-4)
        assert torch.equal(got_labels, exp["labels"])
        assert (got_boxes - exp["boxes"]).abs().max() <= 1e-4


def test_bad_opset_is_a_clear_error(bn_ckpt, tmp_path, capsys):
    assert main(["export", "--weights", str(bn_ckpt), "--out", str(tmp_path / "x.onnx"), "--opset", "9"]) == 2
    assert "--opset 9 is not supported; use 11..20" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("fuse", [True, False])
def test_export_with_head_batchnorm_matches_pytorch(heads_ckpt, tmp_path, caplog, fuse):
    """model.batch_norm [all, heads]: 21 block BNs + 10 head BNs (loc_bn / conf_bn of 5 levels) fold, or are left
    to the exporter with --no-fuse; onnxruntime matches the unfused PyTorch model either way."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "heads.onnx"
    assert (
        main(
            [
                "export",
                "--weights",
                str(heads_ckpt),
                "--out",
                str(out),
                "--dynamic-batch",
                *([] if fuse else ["--no-fuse"]),
            ]
        )
        == 0
    )
    assert ("31 BatchNorms folded" in caplog.text) == fuse
    graph = onnx.load(str(out))
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]  # without --no-fuse: folded by us,
    # with it by the TorchScript exporter's own eval-mode conv+BN folding
    x = images(2, seed=11)
    boxes, scores = run_onnx(out, x)
    ref_boxes, ref_scores = reference(heads_ckpt, x)
    assert (boxes - ref_boxes).abs().max() <= 1e-4 and (scores - ref_scores).abs().max() <= 1e-4
    assert ref_scores[..., 1:].max() > 0.3 and ((ref_boxes > 0) & (ref_boxes < 1)).float().mean() > 0.5  # informative


def test_the_docs_onnx_runtime_snippet_reads_the_input_size_from_the_model(bn_ckpt, tmp_path, monkeypatch):
    """docs/inference.md's ONNX Runtime block, run on a 128 px export (the stand-ins of test_snippets.py
    are 300 px): it must take the input side from the model, not assume SSD300's."""
    pytest.importorskip("onnxruntime")
    import ast

    import cv2

    text = (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
    (block,) = [b for b in text.split("```python\n")[1:] if "ort.InferenceSession" in b.split("```")[0]]
    code = block.split("```")[0]
    ast.parse(code)
    assert main(["export", "--weights", str(bn_ckpt), "--out", str(tmp_path / "ssd300.onnx")]) == 0
    cv2.imwrite(str(tmp_path / "street.jpg"), np.full((90, 160, 3), 127, np.uint8))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/inference.md", "exec"), namespace)
    assert namespace["size"] == 128 and namespace["boxes"].shape == (1, 1524, 4)
    assert namespace["boxes_px"].shape == (1524, 4)
