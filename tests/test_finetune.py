"""Fine-tuning keeps what the source checkpoint was trained with (ssd.engine.finetune).

``model.init`` / ``model.init_backbone`` checkpoints carry their preprocessing and prior layout; every
such key the user did not set is adopted (and logged), a user-set key that differs is an error. The
acceptance test: for each converter layout, the model built for fine-tuning sees the same backbone
features through the training input path as the converted model does through :class:`Detector`.

The converted checkpoints are width-1/8 SSD300s in each foreign layout: our own random network, its keys
renamed with the inverse of the converter's table (the conversion itself is tested in test_convert.py),
then converted by ``convert_file`` as ``ssd convert`` does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ssd.checkpoint import make_checkpoint, save_checkpoint
from ssd.cli import main
from ssd.config import (
    Config,
    ConfigError,
    ModelConfig,
    PreprocessConfig,
    PriorConfig,
    from_dict,
    is_user_set,
    load_config,
    save_config,
)
from ssd.convert import convert_file, convert_vgg
from ssd.convert.caffe_ports import LAYOUTS, caffe_port_key_map
from ssd.convert.common import OUR_VGG_CONVS
from ssd.convert.torchvision import TV_PREPROCESS, TV_SCALES, torchvision_key_map
from ssd.convert.vgg import VGG16_CONV
from ssd.data.dataset import collate
from ssd.data.transforms import build_transforms, normalize_batch
from ssd.engine.finetune import adopt_source_config, init_weights_from
from ssd.inference import Detector
from ssd.model import build_ssd

WIDTH = 0.125  # the converters describe full-width networks; the tests patch the width into the checkpoint
CAFFE_BGR = dict(
    channel_order="bgr", pixel_scale=1.0, mean=[104.0, 117.0, 123.0], std=[1.0, 1.0, 1.0], resize="bilinear"
)
IMAGENET = PreprocessConfig()


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def adopted_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "adopted from" in r.getMessage()]


def foreign_state(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """A random width-1/8, 21-class SSD300 state_dict in ``kind``'s key layout."""
    torch.manual_seed(seed)
    model = build_ssd(ModelConfig(arch="ssd300", width=WIDTH, num_classes=21, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # init_weights zeroes them: a wrong input offset would hide
                p.normal_(0.0, 0.1)
    key_map = torchvision_key_map(6) if kind == "torchvision" else caffe_port_key_map(LAYOUTS[kind], 6)
    theirs = {ours: foreign for foreign, ours in key_map.items()}
    return {theirs[k]: v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """``ssd convert`` output for torchvision, ssd.pytorch (amdegroot) and lufficc layouts."""
    folder = tmp_path_factory.mktemp("converted")
    paths = {}
    for seed, kind in enumerate(("torchvision", "amdegroot", "lufficc")):
        torch.save(foreign_state(kind, seed), folder / f"{kind}.pth")
        ckpt = convert_file(kind, folder / f"{kind}.pth")
        ckpt["config"]["model"]["width"] = WIDTH
        save_checkpoint(ckpt, folder / f"{kind}.pt")
        paths[kind] = folder / f"{kind}.pt"
    return paths


def config_only_checkpoint(path: Path, model_cfg: ModelConfig, kind: str | None = None) -> Path:
    """A checkpoint whose config is all adoption reads (no tensors)."""
    ckpt = make_checkpoint({}, model_cfg, [f"c{i}" for i in range(1, model_cfg.num_classes)], "test")
    save_checkpoint(ckpt | ({"kind": kind} if kind else {}), path)
    return path


def finetune_config(tmp_path: Path, model: dict | None = None, overrides: tuple[str, ...] = ()) -> Config:
    """What ``ssd train CFG [overrides]`` loads: a 3-class width-1/8 model in a YAML file."""
    data = {"model": {"num_classes": 3, "width": WIDTH, **(model or {})}}
    return load_config(write_yaml(tmp_path / "finetune.yaml", data), list(overrides))


# --- adoption --------------------------------------------------------------------------------------


def test_unset_keys_are_adopted_one_line_each(converted, tmp_path, caplog):
    path = converted["amdegroot"]
    cfg = finetune_config(tmp_path, overrides=(f"model.init={path}",))
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        out = adopt_source_config(cfg)
    # resize (bilinear) and the priors (SSD300 VOC preset, corners) already match: no line
    assert adopted_lines(caplog) == [
        f"model.preprocess.channel_order: 'rgb' -> 'bgr' (adopted from model.init {path})",
        f"model.preprocess.pixel_scale: 0.00392156862745098 -> 1.0 (adopted from model.init {path})",
        f"model.preprocess.mean: [0.485, 0.456, 0.406] -> [104.0, 117.0, 123.0] (adopted from model.init {path})",
        f"model.preprocess.std: [0.229, 0.224, 0.225] -> [1.0, 1.0, 1.0] (adopted from model.init {path})",
    ]
    assert out.model.preprocess == PreprocessConfig(**CAFFE_BGR)
    assert out.model.priors == cfg.model.priors and out.model.num_classes == 3 and out.model.width == WIDTH
    assert cfg.model.preprocess == IMAGENET  # the input config is not modified
    assert out.user_keys == cfg.user_keys and not is_user_set(out, "model.preprocess.mean")


def test_torchvision_priors_and_resize_are_adopted(converted, tmp_path, caplog):
    path = converted["torchvision"]
    cfg = finetune_config(tmp_path, overrides=(f"model.init={path}",))
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        out = adopt_source_config(cfg)
    lines = adopted_lines(caplog)
    assert f"model.preprocess.resize: 'bilinear' -> 'normalize_then_bilinear' (adopted from model.init {path})" in lines
    assert f"model.priors.clip: 'corners' -> 'wh' (adopted from model.init {path})" in lines
    assert f"model.priors.scales: None -> {TV_SCALES} (adopted from model.init {path})" in lines
    assert [line.split(":")[0] for line in lines] == [  # channel order and pixel scale already match
        "model.preprocess.mean",
        "model.preprocess.std",
        "model.preprocess.resize",
        "model.priors.clip",
        "model.priors.scales",
    ]
    assert out.model.preprocess == PreprocessConfig(**TV_PREPROCESS)
    assert out.model.priors == PriorConfig(scales=TV_SCALES, clip="wh")


def test_user_set_conflicting_key_is_an_error_naming_both_values(converted, tmp_path):
    amdegroot, tv = converted["amdegroot"], converted["torchvision"]
    cfg = finetune_config(tmp_path, {"preprocess": {"channel_order": "rgb"}}, (f"model.init={amdegroot}",))
    with pytest.raises(
        ConfigError,
        match=rf"^model.preprocess.channel_order: the config sets 'rgb' but model.init {amdegroot} "
        r"was trained with 'bgr'; remove the key",
    ):
        adopt_source_config(cfg)
    cfg = finetune_config(tmp_path, overrides=(f"model.init={tv}", "model.priors.clip=corners"))
    with pytest.raises(
        ConfigError, match=r"^model.priors.clip: the config sets 'corners' but .* was trained with 'wh'"
    ):
        adopt_source_config(cfg)
    cfg = finetune_config(
        tmp_path,
        {"priors": {"min_sizes": [30, 60, 111, 162, 213, 264], "max_sizes": [60, 111, 162, 213, 264, 315]}},
        (f"model.init={tv}",),
    )
    with pytest.raises(
        ConfigError,
        match=r"^model.priors.min_sizes, model.priors.max_sizes: the config sets min_sizes "
        r"\[30.0, 60.0, .*\] / max_sizes \[60.0, .*, 315.0\] but .* was trained with scales \[0.07, 0.15",
    ):
        adopt_source_config(cfg)


def test_cli_train_exits_2_on_a_conflict_before_building_anything(converted, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_path = write_yaml(
        tmp_path / "c.yaml", {"model": {"num_classes": 3, "width": WIDTH}, "train": {"device": "cpu"}}
    )
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(cfg_path),
            "--output-dir",
            str(out),
            "--init",
            str(converted["lufficc"]),
            "model.preprocess.pixel_scale=0.5",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(
        f"ssd train: error: model.preprocess.pixel_scale: the config sets 0.5 but model.init {converted['lufficc']} "
        "was trained with 1.0"
    )
    assert not (out / "config.yaml").exists()  # stopped before the run folder was written (and before any data)


def test_matching_keys_adopt_nothing_and_log_nothing(tmp_path, caplog):
    model_cfg = from_dict(ModelConfig, {"num_classes": 5, "width": WIDTH}, "model")
    path = config_only_checkpoint(tmp_path / "same.pt", model_cfg)
    cfg = finetune_config(tmp_path, {"preprocess": {"mean": [0.485, 0.456, 0.406]}}, (f"model.init={path}",))
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        assert adopt_source_config(cfg) is cfg  # a user-set key equal to the source's is no conflict either
        hand_typed = finetune_config(
            tmp_path, overrides=(f"model.init={path}", "model.preprocess.pixel_scale=0.0039215686")
        )
        assert adopt_source_config(hand_typed) is hand_typed  # 1/255 to 8 decimals is 1/255
        assert adopt_source_config(finetune_config(tmp_path)).model.preprocess == IMAGENET  # no init: nothing to do
    assert caplog.records == []


def test_a_runs_config_yaml_sets_every_key(converted, tmp_path, caplog):
    """Re-running from a run's config.yaml keeps exactly that run's preprocessing: every key in a file is set."""
    path = converted["amdegroot"]
    adopted = adopt_source_config(finetune_config(tmp_path, overrides=(f"model.init={path}",)))
    save_config(adopted, tmp_path / "config.yaml")  # what ssd train writes into the run folder
    again = load_config(tmp_path / "config.yaml")
    assert is_user_set(again, "model.preprocess.mean") and is_user_set(again, "model.priors.clip")
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        assert adopt_source_config(again) is again and adopted_lines(caplog) == []
    scratch = Config(model=ModelConfig(num_classes=3, width=WIDTH))  # a from-scratch run's config.yaml (RGB ImageNet)
    save_config(scratch, tmp_path / "scratch.yaml")
    with pytest.raises(
        ConfigError, match=r"model.preprocess.channel_order: the config sets 'rgb' .* 'bgr'.*config.yaml counts as set"
    ):
        adopt_source_config(load_config(tmp_path / "scratch.yaml", [f"model.init={path}"]))


def test_priors_across_levels_and_input_sizes(converted, tmp_path, caplog):
    tv = converted["torchvision"]
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        # another input size: torchvision's scales are fractions of the input, so they still apply
        out = adopt_source_config(finetune_config(tmp_path, {"input_size": 320}, (f"model.init={tv}",)))
        assert out.model.priors == PriorConfig(scales=TV_SCALES, clip="wh")
        # pixel sizes (lufficc's COCO priors at 300 px) at 320 px: kept as they are, with a warning
        coco = ModelConfig(
            num_classes=81,
            priors=PriorConfig(min_sizes=[21, 45, 99, 153, 207, 261], max_sizes=[45, 99, 153, 207, 261, 315]),
            preprocess=PreprocessConfig(**CAFFE_BGR),
        )
        path = config_only_checkpoint(tmp_path / "coco.pt", coco)
        caplog.clear()
        out = adopt_source_config(finetune_config(tmp_path, {"input_size": 320}, (f"model.init={path}",)))
        assert out.model.priors == PriorConfig() and out.model.preprocess == PreprocessConfig(**CAFFE_BGR)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith(
            f"model.init {path} was trained at 300 px input, this model takes 320 px: its prior min_sizes "
            "[21.0, 45.0, 99.0, 153.0, 207.0, 261.0] / max_sizes [45.0, 99.0, 153.0, 207.0, 261.0, 315.0] "
            "is not adopted"
        )
        # the same at 300 px: adopted
        out = adopt_source_config(finetune_config(tmp_path, overrides=(f"model.init={path}",)))
        assert out.model.priors == coco.priors
        # another number of feature levels: priors stay, preprocessing is still adopted
        caplog.clear()
        extras = [{"mid": 256, "out": 512}, {"mid": 128, "out": 256}, {"mid": 128, "out": 256}]
        out = adopt_source_config(
            finetune_config(tmp_path, {"input_size": 128, "extras": extras}, (f"model.init={tv}",))
        )
        assert out.model.priors == PriorConfig() and out.model.preprocess == PreprocessConfig(**TV_PREPROCESS)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning == (
            f"model.init {tv} has 6 feature levels, this model 5: its priors are not adopted "
            "(its heads do not fit anyway)"
        )


# --- init_backbone -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16_trunk(tmp_path_factory) -> Path:
    """``ssd convert --from vgg16`` of a width-1/8 VGG16 (its fully connected layers full size but stride-0 views)."""
    torch.manual_seed(3)
    ours = build_ssd(ModelConfig(width=WIDTH, dropout=0.0)).state_dict()
    state = {}
    for i, name in zip(VGG16_CONV, OUR_VGG_CONVS, strict=True):
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = ours[f"{name}.weight"], ours[f"{name}.bias"]
    for i, shape in ((0, (4096, 25088)), (3, (4096, 4096)), (6, (1000, 4096))):  # 0.5 GB as real tensors
        state[f"classifier.{i}.weight"] = torch.zeros(1).expand(*shape)
        state[f"classifier.{i}.bias"] = torch.zeros(shape[0])
    ckpt = convert_vgg(state, batch_norm=False)
    ckpt["config"]["model"]["width"] = WIDTH
    path = tmp_path_factory.mktemp("trunk") / "vgg16_reduced.pt"
    save_checkpoint(ckpt, path)
    return path


def test_init_backbone_adopts_preprocessing_only(vgg16_trunk, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        # torchvision's ImageNet VGG16 expects the defaults: nothing to adopt, and its weights load
        cfg = adopt_source_config(finetune_config(tmp_path, overrides=(f"model.init_backbone={vgg16_trunk}",)))
        assert adopted_lines(caplog) == [] and cfg.model.preprocess == IMAGENET
        report = init_weights_from(build_ssd(cfg.model), cfg.model.init_backbone, backbone_only=True)
        assert len(report["loaded"]) == 26  # conv1_1..conv5_3; fc6/fc7 are 1024 wide, this model's 128
        assert report["reinitialised"] == [f"backbone.fc{i}.conv.{p}" for i in (6, 7) for p in ("weight", "bias")]
        with pytest.raises(
            ConfigError,
            match=rf"model.preprocess.channel_order: the config sets 'bgr' but model.init_backbone {vgg16_trunk}",
        ):
            adopt_source_config(
                finetune_config(
                    tmp_path, overrides=(f"model.init_backbone={vgg16_trunk}", "model.preprocess.channel_order=bgr")
                )
            )
        # a Caffe-trained trunk (BGR 0..255 minus the mean), whose config also names other priors: preprocessing only
        caffe = ModelConfig(
            width=WIDTH, priors=PriorConfig(scales=TV_SCALES, clip="wh"), preprocess=PreprocessConfig(**CAFFE_BGR)
        )
        path = config_only_checkpoint(tmp_path / "caffe_trunk.pt", caffe, kind="backbone")
        for key in ("model.init_backbone", "model.init"):  # a trunk-only file as model.init gives no priors either
            caplog.clear()
            out = adopt_source_config(finetune_config(tmp_path, overrides=(f"{key}={path}",)))
            assert out.model.preprocess == PreprocessConfig(**CAFFE_BGR) and out.model.priors == PriorConfig()
            assert [line.split(":")[0] for line in adopted_lines(caplog)] == [
                f"model.preprocess.{k}" for k in ("channel_order", "pixel_scale", "mean", "std")
            ]


def test_init_and_init_backbone_together(converted, vgg16_trunk, tmp_path):
    tv, amdegroot = converted["torchvision"], converted["amdegroot"]
    with pytest.raises(
        ConfigError,
        match=rf"model.preprocess.channel_order: model.init {amdegroot} was trained with 'bgr' but "
        rf"model.init_backbone {vgg16_trunk} with 'rgb'; .* fine-tune from one of them",
    ):
        adopt_source_config(
            finetune_config(tmp_path, overrides=(f"model.init={amdegroot}", f"model.init_backbone={vgg16_trunk}"))
        )
    trunk = config_only_checkpoint(
        tmp_path / "tv_trunk.pt", ModelConfig(preprocess=PreprocessConfig(**TV_PREPROCESS)), kind="backbone"
    )
    out = adopt_source_config(finetune_config(tmp_path, overrides=(f"model.init={tv}", f"model.init_backbone={trunk}")))
    assert out.model.priors == PriorConfig(scales=TV_SCALES, clip="wh")  # model.init decides the priors


# --- the acceptance test: the features of fine-tuning = the features of the converted model ------------


def capture_features(model) -> list[torch.Tensor]:
    """The network input, then every source the heads see ([conv4_3, fc7] + extras), at each forward of ``model``."""
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.backbone.register_forward_hook(lambda m, args, out: seen.extend(out))
    model.extras.register_forward_hook(lambda m, args, out: seen.extend(out))
    return seen


@pytest.mark.parametrize("kind", ["torchvision", "amdegroot", "lufficc"])
def test_finetuning_sees_the_converted_models_features(converted, tmp_path, kind, one_thread):
    path = converted[kind]
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(180, 240, 3), dtype=np.uint8)  # not 300 px: resized on both sides

    # fine-tuning: what _train does with `ssd train CFG --init converted.pt` (3 classes)
    cfg = adopt_source_config(finetune_config(tmp_path, overrides=(f"model.init={path}",)))
    model = build_ssd(cfg.model)
    report = init_weights_from(model, cfg.model.init, backbone_only=False)
    assert sorted(report["reinitialised"]) == sorted(f"head.conf.{i}.{p}" for i in range(6) for p in ("weight", "bias"))
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, cfg.model.input_size, train=False)
    resized, boxes, labels = transform(image, np.zeros((0, 4)), np.zeros(0))
    batch = collate(
        [{"image": resized, "boxes": boxes, "labels": labels, "image_id": "x", "orig_size": image.shape[:2]}]
    )
    trained_on = capture_features(model.eval())
    with torch.no_grad():
        model(normalize_batch(batch["images"], cfg.model.preprocess).contiguous())  # NCHW, as the Detector below

    # the converted model as ssd predict runs it
    detector = Detector.from_checkpoint(path, device="cpu", fuse=False, channels_last=False)
    predicted_on = capture_features(detector.model)
    detector(image)

    assert len(trained_on) == len(predicted_on) == 7
    if kind != "torchvision":  # bilinear: the loader's resize and normalisation are Detector's, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(trained_on, predicted_on, strict=True))
    else:  # the loader resizes the uint8 image, torchvision the normalised float one
        (x_train, *train_features), (x_pred, *pred_features) = trained_on, predicted_on
        assert (x_train - x_pred).abs().max().item() <= 1.0  # std 1/255: the input is in grey levels
        for a, b in zip(train_features, pred_features, strict=True):
            assert (a - b).norm() <= 0.03 * b.norm()  # random weights amplify that rounding to ~1%
    assert torch.equal(model.priors, detector.model.priors)  # and the boxes its heads predict offsets to


def test_data_check_reports_coverage_of_the_priors_a_finetuning_run_trains_with(converted, tmp_path, capsys):
    """``ssd data check`` with ``model.init`` measures the source's priors (torchvision's scales 0.07..1.05,
    clip wh), exactly as a config that spells them out, not the arch preset the YAML would give."""
    from ssd.data.shapes import SHAPES_CLASSES, generate_shapes

    generate_shapes(tmp_path / "shapes", 24, 8, size=96, seed=0)
    split = {"format": "voc", "root": str(tmp_path / "shapes"), "classes": list(SHAPES_CLASSES)}
    data = {"train": {**split, "split": "train"}, "val": {**split, "split": "val"}}

    def check(model: dict, *overrides: str) -> str:
        path = write_yaml(tmp_path / "check.yaml", {"model": {"num_classes": 5, "width": WIDTH, **model}, "data": data})
        # IoU 0.7: a bar that tells prior layouts apart on a dozen images
        assert main(["data", "check", str(path), "--no-images", "loss.iou_threshold=0.7", *overrides]) in (0, 1)
        return capsys.readouterr().out

    adopted = check({}, f"model.init={converted['torchvision']}")
    spelled_out = check({"priors": {"scales": TV_SCALES, "clip": "wh"}})
    preset = check({})
    assert "coverage" in adopted and adopted == spelled_out != preset


@pytest.mark.parametrize("source_bn, target_bn", [("all", ["all", "heads"]), (["all", "heads"], "all")])
def test_head_bn_on_weights_without_it_and_back_says_what_starts_fresh(
    tmp_path, caplog, make_tiny_config, source_bn, target_bn
):
    """model.batch_norm [all, heads] from weights trained with 'all' (and the reverse): everything else loads,
    one line names the head BN layers that start fresh (or go unused) and what happens to the conv biases."""
    source_cfg, target_cfg = make_tiny_config(batch_norm=source_bn), make_tiny_config(batch_norm=target_bn)
    torch.manual_seed(0)
    source = build_ssd(source_cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    path = tmp_path / "source.pt"
    save_checkpoint(make_checkpoint(source.state_dict(), source_cfg, [f"c{i}" for i in range(1, 21)], "train"), path)
    target = build_ssd(target_cfg)
    with caplog.at_level(logging.INFO, logger="ssd.train"):
        report = init_weights_from(target, str(path), backbone_only=False)

    (line,) = [r.getMessage() for r in caplog.records if "head BN" in r.getMessage() or "start fresh" in r.getMessage()]
    bn_keys = [k for k in {**source.state_dict(), **target.state_dict()} if "_bn." in k]
    biases = [f"head.{kind}.{i}.bias" for kind in ("loc", "conf") for i in range(5)]
    if "heads" in target_bn:
        assert line == (
            f"init from {path}: head.loc_bn.0..4, head.conf_bn.0..4 start fresh (not in the checkpoint, trained "
            "without BN in the heads); its head conv biases (10) are not used: with BN in the heads the convs "
            "have none, BN's shift takes their place"
        )
        assert sorted(report["ignored"]) == sorted(biases)
        assert all(
            torch.equal(target.head.conf_bn[i].running_var, torch.ones(target.head.conf_bn[i].num_features))
            for i in range(5)
        )
    else:
        assert line == (
            f"init from {path}: its head BN layers head.loc_bn.0..4, head.conf_bn.0..4 are not used (model.batch_norm "
            "has no 'heads'); the head convs load their weights, which were trained to feed those BN layers, and "
            "their biases start at 0"
        )
        assert sorted(report["ignored"]) == sorted(bn_keys)
        assert all(not target.head.loc[i].bias.any() for i in range(5))
    assert report["reinitialised"] == []
    for kind in ("loc", "conf"):  # the prediction convs keep their names: their weights load either way
        assert torch.equal(getattr(target.head, kind)[0].weight, getattr(source.head, kind)[0].weight)
    assert torch.equal(target.backbone.conv1[0].bn.running_var, source.backbone.conv1[0].bn.running_var)
