"""ssd.config and the CLI's handling of bad user input: every mistake in a config file or an
override names the dotted key, suggests the closest valid key or value, and ``ssd train``
prints it as one line and exits 2 without a traceback."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from ssd.cli import build_parser, main, parse_args
from ssd.config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_override,
    from_dict,
    is_user_set,
    load_config,
    save_config,
    to_dict,
    user_keys,
)

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- keys, types and values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.augment.crop_scale=[0.3, 1.6]", r"crop_scale must lie within \(0, 1\] of the image, got \[0.3, 1.6\]"),
        ("data.augment.crop_scale=[0, 1]", r"crop_scale must be \[low, high\] with 0 < low <= high"),
        ("data.augment.crop_aspect=[2, 0.5]", r"crop_aspect must be \[low, high\] with 0 < low <= high"),
        ("data.augment.contrast_range=[-0.5, 1.5]", r"contrast_range must be \[low, high\] with 0 < low"),
        ("data.augment.saturation_range=[1.5, 0.5]", r"saturation_range must be \[low, high\]"),
        ("data.augment.brightness_delta=300", r"brightness_delta must be in \[0, 255\] pixel levels, got 300.0"),
        ("data.augment.brightness_delta=-1", r"brightness_delta must be in \[0, 255\] pixel levels, got -1.0"),
        ("data.augment.hue_delta=200", r"hue_delta must be in \[0, 180\] degrees, got 200.0"),
        ("data.augment.expand_max_ratio=20", r"expand_max_ratio must be in \[1, 16\] \(the canvas side over"),
        ("data.augment.expand_max_ratio=0.5", r"expand_max_ratio must be in \[1, 16\]"),
    ],
)
def test_augmentation_fields_outside_their_range_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=r"^data\.augment\." + message):
        load_config(None, [override])


def test_augmentation_bounds_are_inclusive_and_the_cli_refuses_in_one_line(tmp_path, capsys):
    edges = ["crop_scale=[1, 1]", "brightness_delta=255", "hue_delta=180", "expand_max_ratio=16", "hue_delta=0"]
    cfg = load_config(None, [f"data.augment.{edge}" for edge in edges])
    assert (cfg.data.augment.crop_scale, cfg.data.augment.expand_max_ratio) == ([1.0, 1.0], 16.0)
    (tmp_path / "run.yaml").write_text("data:\n  augment:\n    crop_scale: [0.3, 1.6]\n")
    assert main(["train", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    where = f"{tmp_path / 'run.yaml'}, line 2"
    assert err == [
        f"ssd train: error: {where}: data.augment.crop_scale must lie within (0, 1] of the image, got [0.3, 1.6]"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", r"unknown config key 'train.lrr' \(did you mean train.lr\?\)"),
        ("trian.lr=0.1", r"unknown config key 'trian' \(did you mean train\?\)"),
        ("train.max_bad_step=3", r"'train.max_bad_step' \(did you mean train.max_bad_steps\?\)"),
        ("model.priors.scale=[0.1]", r"'model.priors.scale' \(did you mean model.priors.scales\?\)"),
        ("data.train.rot=x", r"'data.train.rot' \(did you mean data.train.root\?\)"),
    ],
)
def test_unknown_key_names_the_dotted_key_and_suggests_the_closest(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [override])
    assert "valid keys here:" in str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_iter=abc", r"^train.max_iter: expected an integer, got 'abc'$"),
        ("train.max_iter=2.5", r"^train.max_iter: expected an integer, got 2.5$"),
        ("train.lr=fast", r"^train.lr: expected a number, got 'fast'$"),
        ("train.compile=3", r"^train.compile: expected true or false, got 3$"),
        ("train.steps=5", r"^train.steps: expected a list, got 5$"),
        ("train.steps=[10, x]", r"^train.steps\[1\]: expected an integer, got 'x'$"),
        ("train=5", r"^train: expected a mapping, got int$"),
    ],
)
def test_wrong_type_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bn=froze", r"train.bn: invalid value 'froze' \(did you mean 'frozen'\?\); valid: train, frozen, sync"),
        ("train.optimizer=adam", r"train.optimizer: invalid value 'adam' \(did you mean 'adamw'\?\)"),
        ("train.schedule=cosin", r"did you mean 'cosine'"),
        ("train.lr=-1", r"train.lr must be > 0, got -1.0"),
        ("train.max_bad_steps=0", r"train.max_bad_steps must be >= 1, got 0"),
        ("train.checkpoint_period=0", r"train.checkpoint_period must be >= 1"),
        ("data.worker_nice=20", r"data.worker_nice must be in 0..19 \(a nice increment\), got 20"),
        ("data.num_workers=-1", r"data.num_workers must be >= 0, got -1"),
        ("model.fc6_dilation=0", r"model.fc6_dilation must be >= 1, got 0"),
    ],
)
def test_bad_value_names_the_key_and_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-3` as the string "1e-3"; `lr: 1e-3` must still mean 0.001
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"train": {"lr": "5e-4"}}), ["train.clip_grad_norm=1E+1"])
    assert cfg.train.lr == 5e-4 and cfg.train.clip_grad_norm == 10.0
    with pytest.raises(ConfigError, match="train.max_iter: expected an integer, got '1e5'"):
        load_config(None, ["train.max_iter=1e5"])  # only float fields convert


def test_overrides_parse_yaml_values_and_win_over_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"lr": 0.5, "max_iter": 10}, "model": {"num_classes": 5}})
    cfg = load_config(
        path, ["train.lr=0.002", "train.steps=[10, 20]", "train.clip_grad_norm=null", "model.init=/w/a.pt"]
    )
    assert cfg.train.lr == 0.002 and cfg.train.max_iter == 10 and cfg.model.num_classes == 5
    assert cfg.train.steps == [10, 20] and cfg.train.clip_grad_norm is None and cfg.model.init == "/w/a.pt"


def test_malformed_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"num_classes": 5}})
    with pytest.raises(ConfigError, match=r"override 'train.lr': expected key=value, e.g. train.lr=0.002"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match=r"override 'model.num_classes.x=1': model.num_classes is not a section"):
        load_config(path, ["model.num_classes.x=1"])
    data = {}
    apply_override(data, "a.b.c=[1, 2]")
    assert data == {"a": {"b": {"c": [1, 2]}}}


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_an_error_in_the_file_names_the_file_and_the_line(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("# my run\nmodel:\n  arch: ssd300\n  num_clases: 5\ntrain:\n  lr: 0.1\n")
    typo = (
        f"{path}, line 4: unknown config key 'model.num_clases' (did you mean model.num_classes?); "
        "valid keys here: arch,"
    )
    for overrides in ([], ["train.lr=0.2"]):  # an override elsewhere does not hide where the mistake is
        with pytest.raises(ConfigError) as err:
            load_config(path, overrides)
        assert str(err.value).startswith(typo) and err.value.key == "model.num_clases"
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ssd train: error: {typo}") and not (tmp_path / "run").exists()

    nested = write_yaml(
        tmp_path / "nested.yaml", {"model": {"extras": [{"mid": 256, "out": 512}, {"mid": 128, "out": "x"}]}}
    )
    with pytest.raises(
        ConfigError, match=re.escape(f"{nested}, line 6: model.extras[1].out: expected an integer, got 'x'")
    ):
        load_config(nested)  # safe_dump writes one key per line: model, extras, - mid, out, - mid, out

    section = write_yaml(tmp_path / "section.yaml", {"model": {"num_classes": 5}, "train": {"schedule_by_time": True}})
    with pytest.raises(ConfigError) as err:
        load_config(section)  # a cross-field check points at its section
    assert str(err.value) == f"{section}, line 3: train.schedule_by_time needs train.time_limit (seconds)"
    assert load_config(section, ["train.time_limit=60"]).train.time_limit == 60  # an override may complete the file


def test_an_error_an_override_makes_names_the_key_not_the_file(tmp_path):
    path = write_yaml(tmp_path / "ok.yaml", {"train": {"lr": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.lr=x"])
    assert str(err.value) == "train.lr: expected a number, got 'x'"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.lr=-1"])  # a cross-field check the file alone passes
    assert str(err.value) == "train.lr must be > 0, got -1.0"


def test_relative_data_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    from ssd.data.dataset import build_dataset
    from ssd.data.shapes import SHAPES_CLASSES, generate_shapes

    generate_shapes(tmp_path / "shapes", 0, 3, size=64, seed=0)
    (tmp_path / "configs").mkdir()  # the config's own folder has no shapes/: it is not where paths start
    path = write_yaml(
        tmp_path / "configs" / "c.yaml",
        {"data": {"val": {"root": "shapes", "split": "val", "classes": list(SHAPES_CLASSES)}}},
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert len(build_dataset(cfg.data.val, None, train=False, key="data.val")) == 3
    (tmp_path / "runs").mkdir()
    save_config(cfg, tmp_path / "runs" / "x.yaml")
    again = load_config("runs/x.yaml")  # a run's saved config keeps the path as written: same directory, same data
    assert (
        again.data.val.root == "shapes" and len(build_dataset(again.data.val, None, train=False, key="data.val")) == 3
    )
    monkeypatch.chdir(tmp_path / "configs")
    with pytest.raises(FileNotFoundError, match="^shapes: VOC root folder not found"):
        build_dataset(load_config("c.yaml").data.val, None, train=False, key="data.val")


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(
        None, ["model.input_size=64", "model.extras=[{mid: 8, out: 16}]", "train.lr=0.01", "data.train.root=[a, b]"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert from_dict(Config, to_dict(cfg)) == cfg


# --- the record of user-set keys ------------------------------------------------------------------


def test_load_config_records_the_keys_the_file_and_overrides_set(tmp_path):
    scales = [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05]
    path = write_yaml(
        tmp_path / "c.yaml", {"model": {"num_classes": 5, "priors": {"scales": scales}}, "train": {"lr": 0.1}}
    )
    cfg = load_config(path, ["model.preprocess.mean=[1, 2, 3]", "data.num_workers=0"])
    assert cfg.user_keys == {
        "model",
        "model.num_classes",
        "model.priors",
        "model.priors.scales",
        "train",
        "train.lr",
        "model.preprocess",
        "model.preprocess.mean",
        "data",
        "data.num_workers",
    }
    assert (
        is_user_set(cfg, "model.priors.scales")
        and is_user_set(cfg, "model.priors")
        and is_user_set(cfg, "data.num_workers")
    )
    # a section marks only the keys it lists; defaults are not recorded
    assert not is_user_set(cfg, "model.priors.clip") and not is_user_set(cfg, "model.preprocess.std")
    assert not is_user_set(cfg, "train.max_iter") and not is_user_set(cfg, "eval")
    section = load_config(None, ["model.priors={scales: [0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0], clip: wh}"])
    assert section.user_keys == {"model", "model.priors", "model.priors.scales", "model.priors.clip"}
    assert load_config(None).user_keys == frozenset() and Config().user_keys == frozenset()
    # only the whole config records
    assert not hasattr(from_dict(ModelConfig, {"num_classes": 3}, "model"), "user_keys")


def test_the_record_survives_copies_and_is_not_a_config_key(tmp_path):
    cfg = load_config(None, ["train.lr=0.01", "model.preprocess.channel_order=bgr"])
    assert dataclasses.replace(cfg, eval=cfg.eval).user_keys == cfg.user_keys
    assert copy.deepcopy(cfg).user_keys == cfg.user_keys
    assert cfg == dataclasses.replace(cfg, user_keys=frozenset())  # equal values are equal configs
    assert "user_keys" not in to_dict(cfg)
    save_config(cfg, tmp_path / "config.yaml")
    assert "user_keys" not in (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"unknown config key 'user_keys'"):
        load_config(write_yaml(tmp_path / "bad.yaml", {"user_keys": ["train.lr"]}))


def test_a_saved_config_sets_every_key_when_loaded_back(tmp_path):
    """A run's config.yaml holds every key, so all of them count as set (re-running it changes nothing)."""
    cfg = load_config(None, ["train.lr=0.01"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.user_keys == user_keys(to_dict(cfg))
    assert (
        is_user_set(again, "model.preprocess.mean")
        and is_user_set(again, "model.priors.clip")
        and is_user_set(again, "data.num_workers")
    )


# --- the CLI: one line, exit 2 --------------------------------------------------------------------


def test_cli_missing_config_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    """One line on stderr, exit status 2, nothing written (the real process: tests/test_train.py's signal tests)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ssd train: error: {tmp_path / 'missing.yaml'}: config file not found"
    ]
    assert list(tmp_path.iterdir()) == []


def test_cli_takes_overrides_before_and_after_options(capsys):
    args = parse_args(build_parser(), ["train", "c.yaml", "a=1", "--output-dir", "d", "b=2", "--resume", "c=3"])
    assert (args.config, args.output_dir, args.resume, args.overrides) == ("c.yaml", "d", True, ["a=1", "b=2", "c=3"])
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), ["train", "c.yaml", "--output-dir", "d", "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.fixture
def minimal_config(tmp_path) -> Path:
    return write_yaml(tmp_path / "c.yaml", {"model": {"num_classes": 5}, "train": {"device": "cpu"}})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=0.1"], "ssd train: error: unknown config key 'train.lrr' (did you mean train.lr?)"),
        (["train.bn=sycn"], "ssd train: error: train.bn: invalid value 'sycn' (did you mean 'sync'?)"),
        (["train.max_iter=many"], "ssd train: error: train.max_iter: expected an integer, got 'many'"),
        (["train.lr=0"], "ssd train: error: train.lr must be > 0, got 0.0"),
        (["data.train.root=NOWHERE"], "NOWHERE"),  # a missing dataset folder is named
    ],
)
def test_cli_user_errors_exit_2_with_one_line(minimal_config, tmp_path, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    code = main(["train", str(minimal_config), "--output-dir", str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("ssd train: error: ") and message in err


def test_cli_resume_without_a_checkpoint_exits_2(minimal_config, tmp_path, capsys):
    from ssd.data.shapes import SHAPES_CLASSES, generate_shapes

    generate_shapes(tmp_path / "shapes", 8, 2, size=64)
    data = [f"data.{s}.root={tmp_path / 'shapes'}" for s in ("train", "val")]
    data += [f"data.{s}.split={s}" for s in ("train", "val")] + [
        f"data.{s}.classes={SHAPES_CLASSES}" for s in ("train", "val")
    ]
    data += ["data.num_workers=0", "train.batch_size=4"]
    run = ["train", str(minimal_config), "--output-dir", str(tmp_path / "run")]
    assert main([*run, "--resume", *data]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"ssd train: error: {tmp_path / 'run' / 'last.pt'}: nothing to resume (train without --resume to start)"
    )
    assert main([*run, *data, "model.num_classes=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ssd train: error: model.num_classes is 3 but data.train has 4 classes (+1 background = 5)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cli_cuda_without_cuda_exits_2(minimal_config, tmp_path, capsys):
    assert main(["train", str(minimal_config), "--output-dir", str(tmp_path / "run"), "train.device=cuda"]) == 2
    assert "train.device cuda: CUDA is not available; use cpu or auto" in capsys.readouterr().err
