"""ssd.priorfit and ``ssd data fit-priors``: the prior grid gives the brute-force best IoU, the fit on
small objects needs (and picks) the smallest larger input that reaches 90%, the written config trains,
--keep-input keeps the size; ssd.model.resize derives what follows from a new input size."""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ssd.bench.model import conv_macs_per_image as counted_macs
from ssd.cli import main
from ssd.commands.data_fit_priors import run_fit_priors
from ssd.config import Config, ExtraLayer, ModelConfig, from_dict, load_config, read_yaml_dict
from ssd.data.dataset import index_dataset
from ssd.data.records import ImageRecord, Problems
from ssd.data.shapes import generate_shapes
from ssd.model import build_ssd
from ssd.model.resize import config_at_input_size, conv_macs_per_image, model_feature_sizes
from ssd.priorfit import (
    PriorGrid,
    PriorSizes,
    best_iou,
    best_prior_iou,
    candidate_input_sizes,
    coverage_function,
    fit_priors,
    floored,
    normalised_boxes,
    stride_floors,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_objects(tmp_path_factory) -> Path:
    """40 + 4 images at 160 px with objects of 4-8% of the side: 5-10 px at the demo's 128 px input."""
    root = tmp_path_factory.mktemp("tiny")
    generate_shapes(root, 40, 4, size=160, seed=1, min_side=0.04, max_side=0.08)
    return root


def overrides(root: Path) -> list[str]:
    return [f"data.train.root={root}", f"data.val.root={root}"]


def fit(root: Path, out: Path, **options) -> dict:
    return run_fit_priors(load_config(CONFIG, overrides(root)), read_yaml_dict(CONFIG, overrides(root)), out, **options)


@pytest.fixture(scope="module")
def fitted(tiny_objects, tmp_path_factory) -> tuple[Path, dict, str]:
    """fit-priors on the tiny objects with --max-input 320: the written config, the result, what it printed."""
    out = tmp_path_factory.mktemp("fitted") / "fitted.yaml"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = fit(tiny_objects, out, max_input=320)
    return out, result, printed.getvalue()


# --- the architecture ---------------------------------------------------------------------------


# --- the prior grid -----------------------------------------------------------------------------


def random_records(n: int, seed: int) -> list[ImageRecord]:
    """Boxes of every size and place, touching the borders too, in 200 x 100 images."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-0.1, 1.0, (n, 2))
    wh = np.exp(rng.uniform(np.log(0.01), np.log(1.2), (n, 2)))
    boxes = np.clip(np.concatenate([xy, xy + wh], 1), 0, 1) * [200, 100, 200, 100]
    boxes = boxes[(boxes[:, 2] > boxes[:, 0] + 0.5) & (boxes[:, 3] > boxes[:, 1] + 0.5)].astype(np.float32)
    return [ImageRecord("r", "r.jpg", 200, 100, boxes, np.ones(len(boxes), np.int64), np.zeros(len(boxes), bool))]


@pytest.mark.parametrize(
    "overrides_",
    [
        {
            "width": 0.125,
            "input_size": 128,
            "extras": [{"mid": 256, "out": 512}] * 3,
            "priors": {"scales": [0.12, 0.24, 0.45, 0.66, 0.87, 1.08]},
        },
        {"width": 0.125},  # SSD300: explicit steps (8, 16, ..., 300), the 38 x 8 = 304 px grid is clipped
        {"width": 0.125, "priors": {"clip": "wh", "aspect_ratios": [[2, 3, 4]] * 6}},
        {"width": 0.125, "input_size": 320, "priors": {"clip": "none"}},
    ],
)
def test_grid_best_iou_equals_the_brute_force_over_every_prior(overrides_):
    cfg = from_dict(Config, {"model": overrides_})
    model = build_ssd(cfg.model)
    norm = normalised_boxes(random_records(3000, seed=len(str(overrides_))))
    grid = PriorGrid.of(cfg.model)
    fast = best_iou(norm.double().numpy(), grid, PriorSizes.of(cfg.model, len(grid.feature_sizes))).max(0)
    exact = best_prior_iou(norm, model.priors).numpy()
    assert len(norm) > 2000
    np.testing.assert_allclose(fast, exact, atol=2e-6)


# --- fitting ------------------------------------------------------------------------------------


def test_small_objects_need_a_larger_input_and_the_smallest_that_reaches_90_is_written(tiny_objects, fitted):
    out, result, printed = fitted
    before, after, chosen = result["before"], result["after"], result["fit"]
    assert before["num_boxes"] == 128 and before["all"]["recall"] < 0.05  # the demo's smallest prior is 15 px
    assert after["all"]["recall"] >= 0.9 and after["all"]["recall"] == pytest.approx(chosen.coverage, abs=1e-9)
    assert chosen.model.input_size == 256
    for size in (128, 160, 192, 224):  # every smaller candidate was fitted and stayed below 90%
        line = next(x for x in printed.splitlines() if x.startswith(f"  fitted at input {size} "))
        assert float(line.split()[4].rstrip("%")) < 90.0, line
    assert "cost relative to today: 6132 priors vs 1524 (4.02x)" in printed and "GMAC per image (4.00x)" in printed
    # the written file is today's YAML with only the fitted keys replaced ...
    written, original = yaml.safe_load(out.read_text()), read_yaml_dict(CONFIG, overrides(tiny_objects))
    changed = {"input_size", "extras", "fc6_dilation", "priors"}
    assert {k: v for k, v in written["model"].items() if k not in changed} == {
        k: v for k, v in original["model"].items() if k not in changed
    }
    assert {k: v for k, v in written.items() if k != "model"} == {k: v for k, v in original.items() if k != "model"}
    assert (
        written["model"]["input_size"] == 256
        and written["model"]["fc6_dilation"] == 2
        and len(written["model"]["extras"]) == 4
    )
    assert "scales" not in written["model"]["priors"] and len(written["model"]["priors"]["min_sizes"]) == 6
    # ... that loads, builds the network the fit measured, and gives `ssd data check` the same coverage
    cfg = load_config(out)
    assert model_feature_sizes(cfg.model) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert len(build_ssd(cfg.model).priors) == chosen.num_priors == 6132
    records, _ = index_dataset(cfg.data.train, Problems("raise"))
    assert coverage_function(cfg)(records)["all"] == after["all"]
    # no level got priors smaller than its stride, except the 1x1 map, whose stride (256 px) is above the
    # demo's own last size (scale 0.87 of the input): that one stays
    strides = [256 / h for h, _ in model_feature_sizes(cfg.model)]
    assert all(m >= s for m, s in zip(chosen.sizes.min_px[:-1], strides[:-1], strict=True)), (
        chosen.sizes.min_px,
        strides,
    )
    assert chosen.sizes.min_px[-1] == pytest.approx(load_config(CONFIG).model.priors.scales[-2] * 256)


def test_stride_floors_keep_a_configs_own_smaller_priors():
    ssd300 = ModelConfig()  # its 1x1 map's step is 300 px and its min size 264 px: that stays allowed
    grid = PriorGrid.of(ssd300)
    floors = stride_floors(grid, PriorSizes.of(ssd300, len(grid.feature_sizes)))
    assert floors == pytest.approx([8, 16, 32, 64, 100, 264])
    raised = floored(PriorSizes([4.0, 30.0, 20.0], [5.0, 40.0, 25.0], [[2.0]] * 3), [8.0, 16.0, 32.0])
    assert (raised.min_px, raised.max_px) == ([8.0, 30.0, 32.0], [8.0, 40.0, 32.0])


def test_keep_input_fits_only_the_priors(tiny_objects, tmp_path, capsys):
    out = tmp_path / "kept.yaml"
    result = fit(tiny_objects, out, keep_input=True)
    written = yaml.safe_load(out.read_text())["model"]
    assert written["input_size"] == 128 and written["fc6_dilation"] == 1 and len(written["extras"]) == 3
    assert result["fit"].model.input_size == 128
    assert 0.2 < result["after"]["all"]["recall"] < 0.9  # the 8 px stride limits it, not the sizes
    assert "no fit reaches 90% at input 128; the best one is written" in capsys.readouterr().out


def test_the_fitted_config_trains_unchanged(fitted, tmp_path):
    out = fitted[0]
    run = [
        "train.max_iter=2",
        "train.time_limit=null",
        "train.schedule_by_time=false",
        "train.eval_period=2",
        "train.tensorboard=false",
        "data.num_workers=0",
        "train.batch_size=4",
    ]
    assert main(["train", str(out), *run, "--output-dir", str(tmp_path / "run")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert (
        saved["input_size"] == 256
        and saved["priors"]["min_sizes"] == yaml.safe_load(out.read_text())["model"]["priors"]["min_sizes"]
    )


def test_fit_is_deterministic_and_never_worse_than_today(tmp_path):
    generate_shapes(tmp_path, 30, 0, size=160, seed=5)  # the demo's data: today's priors already fit it
    cfg = load_config(CONFIG, overrides(tmp_path))
    records, _ = index_dataset(cfg.data.train, Problems("raise"))
    boxes = normalised_boxes(records).double().numpy()
    grid = PriorGrid.of(cfg.model)
    today = PriorSizes.of(cfg.model, len(grid.feature_sizes))
    before = float((best_iou(boxes, grid, today).max(0) >= 0.5).mean())
    sizes, covered = fit_priors(boxes, grid, today, 0.5)
    assert covered >= before > 0.8
    assert fit_priors(boxes, grid, today, 0.5) == (sizes, covered)
    assert all(a <= b for a, b in itertools.pairwise(sizes.min_px))  # levels stay in order
    assert all(lo <= hi for lo, hi in zip(sizes.min_px, sizes.max_px, strict=True))


def test_elongated_boxes_get_an_aspect_ratio():
    # 72 x 12 px boxes (aspect 6) centred on cells of the 16 x 16 level (stride 8) of the 128 px input: priors of
    # aspect 2 reach IoU 0.4 at best, aspect 3 reaches 0.53, 4 reaches 0.67
    centres = [(x, y) for x in (np.arange(5, 11) + 0.5) * 8 for y in (np.arange(1, 15, 2) + 0.5) * 8]
    boxes = np.array([[x - 36, y - 6, x + 36, y + 6] for x, y in centres], np.float32)
    records = [ImageRecord("e", "e.jpg", 128, 128, boxes, np.ones(len(boxes), np.int64), np.zeros(len(boxes), bool))]
    cfg = load_config(CONFIG, ["model.priors.aspect_ratios=[[2], [2], [2], [2], [2]]"]).model
    grid = PriorGrid.of(cfg)
    today = PriorSizes.of(cfg, len(grid.feature_sizes))
    norm = normalised_boxes(records).double().numpy()
    assert best_iou(norm, grid, today).max() < 0.41
    sizes, covered = fit_priors(norm, grid, today, 0.5)
    assert covered == 1.0
    added = [(k, r) for k, ratios in enumerate(sizes.aspect_ratios) for r in ratios if r not in today.aspect_ratios[k]]
    assert len(added) == 1 and added[0][1] in (3.0, 4.0)


def test_candidate_input_sizes_are_multiples_of_32():
    assert candidate_input_sizes(128, 256) == [128, 160, 192, 224, 256]
    assert candidate_input_sizes(300, 400) == [300, 320, 352, 384]
    assert candidate_input_sizes(128, 128) == [128]


# --- the network at another input size ----------------------------------------------------------


def test_config_at_input_size_adds_levels_and_scales_fc6_dilation():
    demo = load_config(CONFIG).model
    assert config_at_input_size(demo, 128) == demo
    big = config_at_input_size(demo, 320)
    assert model_feature_sizes(big) == [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert big.extras == demo.extras + [ExtraLayer(128, 256)] * 2 and big.fc6_dilation == 2  # 20 / 8 x 1, rounded down
    ssd300 = from_dict(Config, {"model": {"width": 0.125}}).model
    # 24 -> 12 -> 6 -> 4 -> 2: one stride-2 block appended after the 3x3 valid ones
    at384 = config_at_input_size(ssd300, 384)
    assert model_feature_sizes(at384)[-1] == (1, 1) and at384.fc6_dilation == 7 and at384.priors.steps is None
    with pytest.raises(ValueError, match="smaller than model.input_size 128"):
        config_at_input_size(demo, 96)


def test_conv_macs_on_meta_equal_the_count_of_a_real_forward():
    model = build_ssd(load_config(CONFIG).model).eval()
    assert conv_macs_per_image(model) == counted_macs(model, torch.zeros(1, 3, 128, 128)) == 97_600_640


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_writes_beside_the_config_by_default_and_refuses_model_init(tiny_objects, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.read_text())
    assert main(["data", "fit-priors", str(config), *overrides(tiny_objects), "--keep-input"]) == 0
    assert (tmp_path / "tiny_fitted.yaml").is_file()
    assert f"wrote {tmp_path / 'tiny_fitted.yaml'}" in capsys.readouterr().out
    assert main(["data", "fit-priors", str(config), *overrides(tiny_objects), "model.init=x.pt"]) == 2
    assert "model.init x.pt: a fine-tuning run keeps the priors of its checkpoint" in capsys.readouterr().err
    assert main(["data", "fit-priors", str(config), *overrides(tiny_objects), "--max-input", "96"]) == 2
    assert "--max-input 96 is smaller than model.input_size 128" in capsys.readouterr().err
