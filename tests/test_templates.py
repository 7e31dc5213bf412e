"""The own-data templates in configs/: what a new user copies must load, and the CPU one must train.

``configs/custom_voc_cpu.yaml`` is edited by hand (the EDIT lines) and holds commented COCO and YOLO
alternatives for ``data.train`` / ``data.val``; each alternative, uncommented, must be a valid config.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ssd.cli import build_parser, parse_args
from ssd.config import Config, from_dict, load_config
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.engine.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU_TEMPLATE = CONFIGS / "custom_voc_cpu.yaml"
# "  #   train: {format: coco, ...}": a commented alternative for one split
ALTERNATIVE = re.compile(r"^  #   (train|val): +(\{format: (\w+),.*\})$")


def alternatives(text: str) -> dict[str, dict[str, dict]]:
    """``{format: {split: dataset mapping}}`` of the template's commented blocks."""
    found: dict[str, dict[str, dict]] = {}
    for line in text.splitlines():
        match = ALTERNATIVE.match(line)
        if match:
            split, mapping, fmt = match.groups()
            found.setdefault(fmt, {})[split] = yaml.safe_load(mapping)
    return found


def test_the_cpu_template_s_commented_layouts_are_valid_configs():
    text = CPU_TEMPLATE.read_text()
    data = yaml.safe_load(text)
    blocks = alternatives(text)
    assert sorted(blocks) == ["coco", "yolo"]
    for fmt, splits in blocks.items():
        assert sorted(splits) == ["train", "val"], fmt
        cfg = from_dict(Config, {**data, "data": {**data["data"], **splits}})
        for split in (cfg.data.train, cfg.data.val):
            assert split.format == fmt
            assert split.classes == data["data"]["train"]["classes"]  # the same EDIT list everywhere
    # the EDIT markers: every line a user must change says so
    edits = [line for line in text.splitlines() if "# EDIT" in line]
    assert len(edits) == 7, edits  # num_classes, and root, split, classes of train and val


def test_every_command_a_config_header_suggests_parses(capsys):
    """The ``#   ssd ...`` lines a user copies from a config's header are valid command lines."""
    commands = [
        (path.name, line.split("#", 2)[1].strip())
        for path in sorted(CONFIGS.glob("*.yaml"))
        for line in path.read_text().splitlines()
        if line.startswith("#   ssd ")
    ]
    assert len(commands) >= 10 and any(c.startswith("ssd predict") for _, c in commands)
    for name, command in commands:
        args = parse_args(build_parser(), command.split()[1:])  # argparse exits on an unknown option
        assert args.command == command.split()[1], (name, command)
    assert capsys.readouterr().err == ""


def test_the_gpu_template_says_what_it_needs_and_loads():
    text = (CONFIGS / "custom_voc_example.yaml").read_text()
    assert "GPU" in text and "ssd convert --from" in text
    cfg = load_config(CONFIGS / "custom_voc_example.yaml", [])
    assert cfg.data.num_workers is None  # follows the machine
    assert cfg.model.init == "weights/ssd300_voc.pt"


def test_the_cpu_template_trains_and_evaluates_on_a_generated_voc_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("SSD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "mydata"
    generate_shapes(root, num_train=32, num_val=8, size=128, seed=0)
    classes = "[" + ", ".join(SHAPES_CLASSES) + "]"
    edits = [f"model.num_classes={len(SHAPES_CLASSES) + 1}"]
    for split, name in (("train", "train"), ("val", "val")):
        edits += [f"data.{split}.root={root}", f"data.{split}.split={name}", f"data.{split}.classes={classes}"]
    cfg = load_config(CPU_TEMPLATE, [*edits, "train.max_iter=3", "train.log_period=1", "data.num_workers=0"])
    assert cfg.train.max_iter == 3 and cfg.train.time_limit is None  # a fixed budget, not a clock
    result = train(cfg, tmp_path / "run")
    assert result["iteration"] == 3
    assert 0.0 <= result["best_map"] <= 1.0 and result["best_iter"] == 3
    assert (tmp_path / "run" / "best.pt").exists()
