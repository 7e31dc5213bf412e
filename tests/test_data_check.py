"""ssd.data.check and ``ssd data check``: clean data passes with exact counts, planted problems are
reported by file, prior coverage on hand-made boxes and priors, and the CLI's exit codes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd.cli import main
from ssd.config import load_config
from ssd.data.check import check_dataset, check_split, format_report
from ssd.data.records import ImageRecord, Problems, sanitize_boxes
from ssd.data.shapes import generate_shapes
from ssd.priorfit import coverage_advice, coverage_function, prior_coverage

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes_tiny.yaml"
SIZE = 96
NUM_TRAIN, NUM_VAL = 10, 5


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict]:
    """A clean shapes tree and the generator's summary of it. Read only."""
    out = tmp_path_factory.mktemp("clean")
    return out, generate_shapes(out, NUM_TRAIN, NUM_VAL, size=SIZE, seed=4)


def overrides(root: Path) -> list[str]:
    return [f"data.train.root={root}", f"data.val.root={root}"]


def first_object(xml: Path) -> ET.Element | None:
    return ET.parse(xml).getroot().find("object")


@pytest.fixture(scope="module")
def planted(clean, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A copy of the clean tree with one problem of each kind in train; returns the tree and the file of each."""
    root = Path(shutil.copytree(clean[0], tmp_path_factory.mktemp("planted") / "shapes"))
    ann, jpg = root / "Annotations", root / "JPEGImages"
    with_objects = [f"train_{i:06d}" for i in range(NUM_TRAIN) if first_object(ann / f"train_{i:06d}.xml") is not None]
    missing, truncated, unknown, resized, clipped = with_objects[:5]
    (jpg / f"{missing}.jpg").unlink()
    data = (jpg / f"{truncated}.jpg").read_bytes()
    (jpg / f"{truncated}.jpg").write_bytes(data[: len(data) // 2])
    for image_id, edit in ((unknown, "name"), (resized, "width"), (clipped, "xmax")):
        xml = ann / f"{image_id}.xml"
        tree = ET.parse(xml)
        if edit == "name":
            tree.getroot().find("object/name").text = "hexagon"
        elif edit == "width":
            tree.getroot().find("size/width").text = "120"
        else:
            width = int(tree.getroot().find("size/width").text)
            tree.getroot().find("object/bndbox/xmax").text = str(width + 2)  # an overshoot: clipped
        tree.write(xml)
    files = {
        "missing image": jpg / f"{missing}.*",
        "unreadable image": jpg / f"{truncated}.jpg",
        "unknown class": ann / f"{unknown}.xml",
        "size mismatch": jpg / f"{resized}.jpg",
        "box crossing the image border clipped": ann / f"{clipped}.xml",
    }
    return root, files


# --- check_dataset ----------------------------------------------------------------------------------


def test_clean_tree_has_no_problems_and_the_generators_counts(clean):
    root, summary = clean
    cfg = load_config(CONFIG, overrides(root))
    reports = check_dataset(cfg, ["train", "val"], coverage=coverage_function(cfg))
    assert [r.name for r in reports] == ["data.train", "data.val"]
    for report, split in zip(reports, ("train", "val"), strict=True):
        stats = summary["splits"][split]
        assert report.ok and not report.problems.counts and not report.problems.fixed
        assert report.num_images == stats["images"]
        assert report.objects == Counter({k: n for k, n in stats["objects_per_class"].items() if n})
        assert sum(report.objects.values()) == stats["objects"] > 0
        assert report.empty_images == stats["empty_images"]
        assert report.difficult == 0
        cov = report.coverage
        assert cov["num_boxes"] == cov["all"]["boxes"] == stats["objects"]
        assert sum(cov[k]["boxes"] for k in ("small", "medium", "large")) == stats["objects"]
        assert 0.0 <= cov["all"]["recall"] <= 1.0 and cov["iou_threshold"] == cfg.loss.iou_threshold
        text = format_report(report)
        assert text.startswith(
            f"data.{split}: {stats['images']} images, {stats['objects']} objects (0 difficult/crowd)"
        )
        assert text.endswith("no problems found")


def test_planted_problems_are_each_reported_with_their_file(planted):
    root, files = planted
    cfg = load_config(CONFIG, overrides(root))
    train, val = check_dataset(cfg, ["train", "val"])
    assert val.ok
    assert not train.ok
    assert train.problems.counts == Counter(
        {"missing image": 1, "unreadable image": 1, "unknown class": 1, "size mismatch": 1}
    )
    assert train.problems.fixed == Counter({"box crossing the image border clipped": 1})
    assert train.num_images == NUM_TRAIN - 1  # only the missing image has no record
    # no coverage function: the data package never builds the model
    assert train.coverage is None and val.coverage is None
    for kind, path in files.items():
        assert train.problems.examples[kind][0].startswith(str(path)), kind
    assert "truncated JPEG" in train.problems.examples["unreadable image"][0]
    assert "'hexagon'" in train.problems.examples["unknown class"][0]
    assert f"image is {SIZE}x{SIZE}, annotation says 120x{SIZE}" in train.problems.examples["size mismatch"][0]
    text = format_report(train)
    assert "  problems:" in text
    assert (
        "1 x box crossing the image border clipped (repaired), "
        f"e.g. {files['box crossing the image border clipped']}: 1 box" in text
    )


def test_every_repaired_file_is_named_and_all_lists_every_problem():
    problems = Problems("skip")
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5, 9], [90, 90, 103, 99]], np.float32)  # fine, degenerate, crossing
    for name in ("a.xml", "b.xml", "c.xml"):
        sanitize_boxes(boxes, 100, 100, problems, name)
    problems.fix("degenerate box dropped (x2 <= x1 or y2 <= y1)", "c.xml")  # a second repair in the same file
    for name in ("d.xml", "e.xml"):
        problems.report("unknown class", name, "object class 'hexagon'")
    short = problems.summary()
    assert short == [
        "2 x unknown class, e.g. d.xml: object class 'hexagon' (and 1 more)",
        "3 x box crossing the image border clipped (repaired), e.g. a.xml: 1 box (and 2 more)",
        "4 x degenerate box dropped (x2 <= x1 or y2 <= y1) (repaired), e.g. a.xml: 1 box (and 2 more)",
    ]
    every = problems.summary(every=True)
    assert every == [
        "2 x unknown class:",
        "  d.xml: object class 'hexagon'",
        "  e.xml: object class 'hexagon'",
        "3 x box crossing the image border clipped (repaired):",
        "  a.xml: 1 box",
        "  b.xml: 1 box",
        "  c.xml: 1 box",
        "4 x degenerate box dropped (x2 <= x1 or y2 <= y1) (repaired):",
        "  a.xml: 1 box",
        "  b.xml: 1 box",
        "  c.xml: 2 boxes",
    ]


def test_check_split_without_decoding_misses_only_the_pixel_problems(planted):
    root, _ = planted
    report, records, classes = check_split(
        load_config(CONFIG, overrides(root)).data.train, "data.train", decode_images=False
    )
    assert report.problems.counts == Counter({"missing image": 1, "unknown class": 1})
    assert len(records) == NUM_TRAIN - 1 and classes == ["circle", "square", "triangle", "star"]


# --- prior coverage ---------------------------------------------------------------------------------


def record(width: int, height: int, boxes: list, difficult: list | None = None) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageRecord("x", "x.jpg", width, height, boxes, np.ones(len(boxes), np.int64), difficult)


def xyxy_to_cxcywh(boxes: list) -> torch.Tensor:
    b = torch.tensor(boxes, dtype=torch.float32)
    return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)


def test_priors_equal_to_the_boxes_give_full_recall():
    records = [record(200, 100, [[20, 10, 60, 50], [100, 0, 200, 100]])]
    priors = xyxy_to_cxcywh([[0.1, 0.1, 0.3, 0.5], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 0.05, 0.05]])
    cov = prior_coverage(records, priors, input_size=300)
    assert cov["num_boxes"] == 2 and cov["all"] == {"boxes": 2, "recall": 1.0}
    assert cov["best_iou_mean"] == pytest.approx(1.0, abs=1e-6)
    assert "unmatched_median_side_px" not in cov
    assert coverage_advice(cov, smallest_prior_px=15.0, input_size=300) is None


def test_boxes_smaller_than_every_prior_are_missed_and_the_advice_says_lower_min_sizes():
    records = [record(128, 128, [[x, x, x + 4, x + 4] for x in (10, 50, 90)])]
    grid = torch.arange(0.15, 0.9, 0.1)
    cx, cy = torch.meshgrid(grid, grid, indexing="xy")
    priors = torch.stack(
        [cx.flatten(), cy.flatten(), torch.full_like(cx.flatten(), 0.3), torch.full_like(cx.flatten(), 0.3)], 1
    )
    cov = prior_coverage(records, priors, input_size=128)
    assert cov["all"] == {"boxes": 3, "recall": 0.0} and cov["small"] == {"boxes": 3, "recall": 0.0}
    assert cov["best_iou_mean"] < 0.02
    assert cov["unmatched_median_side_px"] == pytest.approx(4.0)
    advice = coverage_advice(cov, smallest_prior_px=0.3 * 128, input_size=128)
    assert (
        "lower model.priors.min_sizes" in advice
        and "median side 4 px" in advice
        and "smallest prior is 38 px" in advice
    )


def test_elongated_unmatched_boxes_get_aspect_ratio_advice():
    records = [record(128, 128, [[0, 48, 128, 80]])]  # 128 x 32: aspect 4
    cov = prior_coverage(records, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), input_size=128)
    assert cov["all"]["recall"] == 0.0 and cov["unmatched_median_aspect"] == pytest.approx(4.0)
    assert "model.priors.aspect_ratios" in coverage_advice(cov, smallest_prior_px=20.0, input_size=128)


def test_size_buckets_count_area_in_input_pixels():
    # 256 px images seen at a 128 px input: sides 62, 64, 190, 192 become 31, 32, 95, 96 input pixels
    records = [
        record(
            256, 256, [[0, 0, 62, 62], [100, 100, 110, 110]], difficult=[False, True]
        ),  # the difficult one is ignored
        record(256, 256, [[192, 192, 256, 256]]),
        record(256, 256, [[0, 0, 190, 190]]),
        record(256, 256, [[64, 64, 256, 256]]),
    ]
    priors = xyxy_to_cxcywh([[0.25, 0.25, 1.0, 1.0]])  # exactly the 96 px box; IoU < 0.5 with the others
    cov = prior_coverage(records, priors, input_size=128)
    assert cov["num_boxes"] == 4
    assert cov["small"] == {"boxes": 1, "recall": 0.0}  # 31^2 < 32^2
    assert cov["medium"] == {"boxes": 2, "recall": 0.0}  # 32^2 and 95^2
    assert cov["large"] == {"boxes": 1, "recall": 1.0}  # 96^2 and up
    assert cov["all"] == {"boxes": 4, "recall": 0.25}
    assert cov["unmatched_median_side_px"] == pytest.approx(32.0)


def test_no_boxes_give_no_recall_and_no_advice():
    cov = prior_coverage([record(64, 64, [])], xyxy_to_cxcywh([[0, 0, 1, 1]]), input_size=64)
    assert cov["num_boxes"] == 0 and cov["all"] == {"boxes": 0, "recall": None}
    assert coverage_advice(cov, 10.0, 64) is None


# --- the CLI ----------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssd", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_clean_data_exits_0(clean, capsys):
    root, summary = clean
    assert main(["data", "check", str(CONFIG), *overrides(root)]) == 0
    out = capsys.readouterr().out
    stats = summary["splits"]["train"]
    assert f"data.train: {NUM_TRAIN} images, {stats['objects']} objects" in out
    assert f"data.val: {NUM_VAL} images" in out
    assert out.count("no problems found") == 2


def test_cli_unknown_key_exits_2_with_one_line_and_a_suggestion(clean):
    """The real process (ssd data check's one subprocess test): exit 2, one line, no traceback."""
    result = run_cli("data", "check", str(CONFIG), f"data.train.rot={clean[0]}")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "ssd data: error: unknown config key 'data.train.rot' (did you mean data.train.root?)"
    )
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_planted_problem_exits_1_naming_the_file(planted, capsys):
    root, files = planted
    assert main(["data", "check", str(CONFIG), *overrides(root), "--split", "train"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"1 x missing image, e\.g\. {re.escape(str(files['missing image']))}: no image for id", out)
    assert f"1 x unknown class, e.g. {files['unknown class']}: object class 'hexagon'" in out
    assert "data.val" not in out
    assert "  prior coverage (best prior IoU >= 0.5): all " in out  # the CLI brings the coverage (ssd.priorfit)


def test_cli_all_lists_every_problem_under_its_kind(planted, capsys):
    root, files = planted
    assert main(["data", "check", str(CONFIG), *overrides(root), "--split", "train", "--all"]) == 1
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("    1 x box crossing the image border clipped (repaired):")
    assert lines[at + 1] == f"      {files['box crossing the image border clipped']}: 1 box"
    at = lines.index("    1 x unknown class:")
    assert lines[at + 1].startswith(f"      {files['unknown class']}: object class 'hexagon'")


def test_cli_missing_config_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["data", "check", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"ssd data: error: {missing}: config file not found\n"
    assert captured.out == ""


def test_a_split_without_boxes_says_so_instead_of_an_empty_coverage_line():
    from ssd.config import load_config
    from ssd.data.check import CheckReport
    from ssd.priorfit import coverage_function

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.yaml")
    cov = coverage_function(cfg)([])  # no object of the listed classes anywhere
    text = format_report(CheckReport("data.train", num_images=3, empty_images=3, coverage=cov))
    assert "  prior coverage: no boxes to measure it on" in text.splitlines()
    assert "prior coverage (best prior IoU" not in text
