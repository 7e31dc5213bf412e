"""The VGG stem (conv1, conv2) runs image chunks on the CPU when nothing in it needs a gradient.

Checked on a real tiny SSD: which calls chunk (inference, frozen conv1-2 in training) and which must not
(a trainable stem, BatchNorm in training mode, tracing, another device), that the chunks cover the batch
in order, and that outputs and gradients equal the whole-batch run's.
"""

from __future__ import annotations

import pytest
import torch

from ssd.config import LossConfig
from ssd.engine.finetune import freeze_blocks
from ssd.loss import build_loss
from ssd.model import build_ssd
from ssd.ops.boxes import pad_targets

pytestmark = pytest.mark.numerics


def conv1_batches(model) -> list[int]:
    """Batch sizes conv1 sees, in order (a forward hook, removed by the caller through ``.remove()``)."""
    seen: list[int] = []
    model.backbone.conv1[0].conv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


def chunked_model(make_tiny_config, chunk: int, **overrides):
    """A tiny SSD whose stem budget holds ``chunk`` images (conv1 output 8 x 128 x 128 fp32 each)."""
    torch.manual_seed(0)
    model = build_ssd(make_tiny_config(dropout=0.0, **overrides)).to(memory_format=torch.channels_last)
    model.backbone.stem_chunk_bytes = chunk * 8 * 128 * 128 * 4
    return model


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last
    )


def test_inference_chunks_cover_the_batch_in_order_and_equal_the_whole_batch(make_tiny_config):
    model = chunked_model(make_tiny_config, 2).eval()
    seen = conv1_batches(model)
    x = images(5)
    with torch.no_grad():
        chunked = model(x)
        assert seen == [2, 2, 1]
        model.backbone.stem_chunk_bytes = 0
        whole = model(x)
    assert seen == [2, 2, 1, 5]
    for key in ("loc", "conf"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-5, atol=1e-6)
    # each image's result is its own: the first two images alone give the batch's first two rows
    with torch.no_grad():
        torch.testing.assert_close(model(x[:2])["conf"], whole["conf"][:2], rtol=1e-5, atol=1e-6)
    feats = model.backbone.stem(x[:2])
    assert feats.is_contiguous(memory_format=torch.channels_last)


def test_default_budget_chunks_ssd300_image_by_image_and_the_tiny_model_by_eight(make_tiny_config):
    """The default budget (4 MiB): SSD300's conv1 output is 23 MiB per image, the tiny model's 0.5 MiB."""
    torch.manual_seed(0)
    tiny = build_ssd(make_tiny_config()).eval()
    with torch.no_grad():
        assert tiny.backbone.stem_chunk(torch.zeros(64, 3, 128, 128)) == 8
        assert tiny.backbone.stem_chunk(torch.zeros(8, 3, 128, 128)) == 0  # one chunk: the batch as it is
        assert tiny.backbone.stem_chunk(torch.zeros(1, 3, 128, 128)) == 0
        assert tiny.backbone.stem_chunk(torch.zeros(2, 3, 300, 300, device="meta")) == 0
        assert tiny.backbone.stem_chunk(torch.zeros(16, 3, 1000, 1000)) == 1  # 31 MiB per image: one at a time


def test_frozen_stem_chunks_in_training_with_the_same_loss_and_gradients(make_tiny_config):
    model = chunked_model(make_tiny_config, 3).train()
    freeze_blocks(model, ["conv1", "conv2"])
    seen = conv1_batches(model)
    x = images(6)
    boxes, labels = pad_targets(
        [torch.tensor([[0.1, 0.1, 0.6, 0.5]]), torch.tensor([[0.3, 0.2, 0.9, 0.9], [0.0, 0.5, 0.4, 1.0]])] * 3,
        [torch.tensor([1]), torch.tensor([2, 3])] * 3,
    )
    criterion = build_loss(LossConfig(), make_tiny_config())

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        losses = criterion(model(x), boxes, labels, model.priors)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(sum(losses.values()).detach()), grads

    loss, grads = loss_and_grads()
    assert seen == [3, 3]
    model.backbone.stem_chunk_bytes = 0
    whole_loss, whole_grads = loss_and_grads()
    assert seen == [3, 3, 6]
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    assert grads.keys() == whole_grads.keys() and "backbone.conv3.0.conv.weight" in grads
    assert not any(n.startswith(("backbone.conv1.", "backbone.conv2.")) for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_chunks_where_the_stem_needs_the_whole_batch(make_tiny_config):
    # a trainable stem: its weights need a gradient
    model = chunked_model(make_tiny_config, 1).train()
    seen = conv1_batches(model)
    model(images(4))
    # an input that needs a gradient, even with the stem frozen
    freeze_blocks(model, ["conv1", "conv2"])
    model(images(4).requires_grad_())
    assert seen == [4, 4]
    # BatchNorm in training mode normalises with the batch's statistics, frozen or not
    bn = chunked_model(make_tiny_config, 1, batch_norm=["conv1"]).train()
    freeze_blocks(bn, ["conv1", "conv2"])
    seen_bn = conv1_batches(bn)
    bn(images(4))
    assert seen_bn == [4]
    # ... and chunks once that BN is in eval mode, as the engine puts frozen blocks' BN
    bn.backbone.conv1.eval()
    bn(images(4))
    assert seen_bn == [4, 1, 1, 1, 1]


# the ONNX exporter (dynamo=False) traces the same way
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_a_trace_is_one_batch_and_runs_at_other_batch_sizes(make_tiny_config):
    """ONNX export traces the model: the graph must not unroll the example's chunks."""
    model = chunked_model(make_tiny_config, 1).eval()
    seen = conv1_batches(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, images(4), strict=False, check_trace=False)
        assert seen == [4]
        model.backbone.stem_chunk_bytes = 0
        torch.testing.assert_close(traced(images(3))["conf"], model(images(3))["conf"], rtol=1e-5, atol=1e-6)


def test_the_bn_studys_activation_taps_see_every_chunk(make_tiny_config):
    """The study's hooks on conv1_2 / conv2_2 are called once per chunk: they keep all of them."""
    from ssd.studies.bn_study_activations import preactivations

    model = chunked_model(make_tiny_config, 8, batch_norm="none")
    images = torch.randn(12, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model.backbone.stem_chunk(images) == 8  # 8 + 4 images
    chunked = preactivations(model, images, max_values=10**9)
    model.backbone.stem_chunk_bytes = 0  # the whole batch at once
    whole = preactivations(model, images, max_values=10**9)
    assert chunked.keys() == whole.keys()
    assert chunked["conv1_2"].numel() == 12 * 8 * 128 * 128 and chunked["conv2_2"].numel() == 12 * 16 * 64 * 64
    for name in chunked:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)
