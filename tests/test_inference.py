"""Detector and ``ssd predict``: predict == eval on a generated dataset, input types, parity with
torchvision's own ssd300_vgg16 on non-square images, folders, a generated video, bad inputs, JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from ssd import Detector
from ssd.checkpoint import checkpoint_model_config, make_checkpoint, model_from_checkpoint, save_checkpoint
from ssd.cli import main
from ssd.config import AugmentConfig, DatasetConfig, PostprocessConfig
from ssd.convert import convert_torchvision
from ssd.data.dataset import build_dataset
from ssd.data.loader import build_dataloader
from ssd.data.shapes import SHAPES_CLASSES
from ssd.data.transforms import build_transforms
from ssd.engine.evaluate import predict_loader
from ssd.model import build_ssd
from ssd.postprocess import build_postprocess
from ssd.visualize import class_color, draw_detections

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(shapes_data) -> Path:
    """6 val images of 160 px: the tiny model's 128 px input needs a resize."""
    return shapes_data(0, 6, 160, 4)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, make_tiny_config) -> Path:
    """A tiny 4-class BN model with random weights, saved as a training checkpoint."""
    cfg = make_tiny_config(batch_norm="all", num_classes=len(SHAPES_CLASSES) + 1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(make_checkpoint(build_ssd(cfg).state_dict(), cfg, SHAPES_CLASSES, "train"), path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_ckpt) -> Detector:
    return Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=0.01, batch_size=4)


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: more image-like (and JPEG-stable) than uniform noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], -1) * rng.uniform(0.4, 1.0, 3)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def write_rgb(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def assert_same_detections(a: dict, b: dict, atol: float = 0.0) -> None:
    assert torch.equal(a["labels"], b["labels"])
    torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=atol)
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=atol * 1000)


def matched(expected: dict, got: dict, iou: float = 0.9999, score_tol: float = 1e-4) -> torch.Tensor:
    """For each expected detection: is there one in ``got`` with the same label, IoU >= iou and a
    score within ``score_tol``? (Near-equal scores may swap places, so compare as sets.)"""
    return (
        (box_iou(expected["boxes"], got["boxes"]) >= iou)
        & (expected["labels"][:, None] == got["labels"][None])
        & ((expected["scores"][:, None] - got["scores"][None]).abs() <= score_tol)
    ).any(dim=1)


# --- Detector ------------------------------------------------------------------------------------


def test_predict_equals_eval_on_the_same_images(tiny_ckpt, shapes):
    """Detector (checkpoint preprocessing: cv2 resize of uint8, then normalise) == the eval loader path."""
    model, ckpt = model_from_checkpoint(tiny_ckpt)
    model_cfg = checkpoint_model_config(ckpt)
    dataset_cfg = DatasetConfig(format="voc", root=str(shapes), split="val", classes=SHAPES_CLASSES)
    transform = build_transforms(AugmentConfig(), model_cfg.preprocess, model_cfg.input_size, train=False)
    dataset = build_dataset(dataset_cfg, transform, train=False, key="data.val")
    loader = build_dataloader(dataset, 3, train=False, num_workers=0)
    post = build_postprocess(PostprocessConfig(), model_cfg)
    expected = predict_loader(model.eval(), loader, post, model_cfg.preprocess, torch.device("cpu"))

    paths = [rec.path for rec in dataset.records]
    exact = Detector.from_checkpoint(
        tiny_ckpt, device="cpu", score_thresh=0.01, batch_size=3, fuse=False, channels_last=False
    )
    fast = Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=0.01, batch_size=3)  # BN folded, NHWC
    assert len(expected) == 6
    for rec, g, f in zip(dataset.records, exact(paths), fast(paths), strict=True):
        e = {k: torch.from_numpy(v) for k, v in expected[rec.image_id].items()}
        assert len(e["scores"]) == 200  # random weights: the full 200 per image, a demanding comparison
        assert_same_detections(g, e)  # bit for bit: the same preprocessing, model and post-processing
        assert g["names"] == [SHAPES_CLASSES[i - 1] for i in g["labels"].tolist()]
        assert matched(e, f, iou=0.999, score_tol=1e-5).float().mean() >= 0.99  # float rounding may swap near-ties


def test_input_types_give_the_same_detections(tiny, tmp_path):
    image = random_image(90, 150, seed=1)
    path = write_rgb(tmp_path / "a.png", image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    ref = tiny(image)
    assert isinstance(ref, dict) and len(ref["scores"]) > 0
    assert ref["boxes"].dtype == torch.float32 and ref["labels"].dtype == torch.int64
    # original-image pixels: inside the 150 x 90 image, and reaching beyond the 128 px input
    assert ref["boxes"][:, [0, 2]].max() <= 150 and ref["boxes"][:, [1, 3]].max() <= 90
    assert ref["boxes"][:, [0, 2]].max() > 128
    for other in (str(path), path, chw, chw.float() / 255.0):
        assert_same_detections(tiny(other), ref)
    batch = tiny([image, path, chw])
    assert isinstance(batch, list) and len(batch) == 3
    for d in batch + tiny(torch.stack([chw, chw])):
        assert_same_detections(d, ref, atol=1e-5)  # other batch sizes: same maths, other kernels


def test_batch_size_does_not_change_results(tiny_ckpt):
    images = [random_image(64 + 16 * i, 200 - 20 * i, seed=i) for i in range(5)]
    one = Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=0.01, batch_size=1)(images)
    four = Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=0.01, batch_size=4)(images)
    for a, b in zip(one, four, strict=True):
        assert_same_detections(a, b, atol=1e-5)


def test_score_threshold_equals_filtering_afterwards(tiny_ckpt):
    image = random_image(120, 120, seed=7)
    low = Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=0.01)(image)
    high = Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=0.9)(image)
    keep = low["scores"] > 0.9  # the random model is confident: its 200 best all score > 0.6
    assert 0 < int(keep.sum()) < len(low["scores"])
    assert_same_detections(high, {k: v[keep] for k, v in low.items() if k != "names"})


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((10, 10), np.uint8), "HxWx3 uint8"),
        (np.zeros((10, 10, 3), np.float32), "dtype float32"),
        (torch.zeros(10, 10, 3), "3xHxW"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), "torch.int32"),
        (3.5, "float"),
        ("no/such/image.jpg", "no/such/image.jpg"),
    ],
)
def test_bad_inputs_are_refused_by_name(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny(bad)


def test_bad_arguments_are_refused(tiny_ckpt):
    with pytest.raises(ValueError, match="score threshold"):
        Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        Detector.from_checkpoint(tiny_ckpt, device="cpu", batch_size=0)


# --- parity with torchvision ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv21(tv_ssd300):
    """The shared random torchvision SSD300 (21 classes), rescaled so scores are spread, not saturated."""
    model = copy.deepcopy(tv_ssd300).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.head.classification_head.module_list:
            m.weight.mul_(0.4)
        for m in model.head.regression_head.module_list:
            m.weight.mul_(0.25)
    return model


@pytest.fixture(scope="module")
def tv21_ckpt(tv21, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tv") / "tv21.pt"
    save_checkpoint(convert_torchvision(tv21.state_dict()), path)
    return path


@pytest.mark.numerics
def test_predict_cli_matches_torchvision_on_non_square_images(tv21, tv21_ckpt, tmp_path):
    """``ssd predict`` JSON == torchvision's model on the same PNGs (320x240 and 375x500 need resizing)."""
    images = [random_image(240, 320, seed=10), random_image(500, 375, seed=11)]
    paths = [write_rgb(tmp_path / "in" / f"{i}.png", im) for i, im in enumerate(images)]
    out_json = tmp_path / "dets.json"
    rc = main(
        [
            "predict",
            "--weights",
            str(tv21_ckpt),
            *map(str, paths),
            "--json",
            str(out_json),
            "--score-thresh",
            "0.01",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    entries = json.loads(out_json.read_text())
    with torch.no_grad():
        expected = tv21([torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images])
    assert [(e["width"], e["height"]) for e in entries] == [(320, 240), (375, 500)]
    for entry, path, exp in zip(entries, paths, expected, strict=True):
        assert entry["image"] == str(path)
        dets = entry["detections"]
        got = {
            "boxes": torch.tensor([d["box"] for d in dets]),
            "scores": torch.tensor([d["score"] for d in dets]),
            "labels": torch.tensor([d["label"] for d in dets]),
        }
        assert len(dets) == len(exp["scores"]) == 200
        assert exp["scores"][0] < 0.999 and exp["scores"][0] - exp["scores"][-1] > 0.05  # spread, not saturated
        assert exp["labels"].unique().numel() >= 3
        assert matched(exp, got).all(), f"{int((~matched(exp, got)).sum())} of torchvision's detections not found"
        assert all(d["name"] == f"class{d['label']}" for d in dets)


def test_detector_matches_torchvision_on_float_tensors(tv21, tv21_ckpt):
    """torchvision's own input convention (float CHW in [0, 1], any size) through the Python API."""
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 200, 410, generator=g)]
    det = Detector.from_checkpoint(tv21_ckpt, device="cpu", score_thresh=0.01)
    with torch.no_grad():
        expected = tv21(images)
    for exp, got in zip(expected, det(images), strict=True):
        assert len(got["scores"]) == len(exp["scores"]) == 200
        assert matched(exp, got).all()


# --- ssd predict ---------------------------------------------------------------------------------


def make_video(path: Path, frames: int = 5, size_wh: tuple[int, int] = (96, 64)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, size_wh)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(cv2.cvtColor(random_image(size_wh[1], size_wh[0], seed=100 + i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def test_predict_folders_video_and_failures(tiny_ckpt, tmp_path, capsys, caplog):
    root = tmp_path / "photos"
    sizes = {"a.jpg": (100, 140), "nested/deeper/b.PNG": (80, 60), "nested/c.jpeg": (128, 128)}
    for name, (h, w) in sizes.items():
        write_rgb(root / name, random_image(h, w, seed=len(name)))
    (root / "notes.txt").write_text("not an image, not picked up")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    single = write_rgb(tmp_path / "single" / "a.jpg", random_image(50, 70, seed=3))  # same name as photos/a.jpg
    video = make_video(tmp_path / "clip.mp4")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    args = [
        "predict",
        "--weights",
        str(tiny_ckpt),
        str(root),
        str(single),
        str(video),
        str(tmp_path / "missing.jpg"),
        str(tmp_path / "empty"),
        "--out",
        str(out),
        "--json",
        str(out / "dets.json"),
        "--score-thresh",
        "0.05",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]
    assert main(args) == 1  # some inputs failed
    err = capsys.readouterr().err
    for problem in ("broken.jpg: truncated JPEG", "missing.jpg: no such file", "empty: no images"):
        assert problem in err
    assert "3 input(s) failed" in caplog.text

    entries = json.loads((out / "dets.json").read_text())
    images = [e for e in entries if "frame" not in e]
    frames = [e for e in entries if "frame" in e]
    assert sorted(Path(e["image"]).name for e in images) == ["a.jpg", "a.jpg", "b.PNG", "c.jpeg"]
    assert [e["frame"] for e in frames] == list(range(5)) and {e["image"] for e in frames} == {str(video)}
    for e in entries:
        assert list(e) in (
            ["image", "width", "height", "detections"],
            ["image", "width", "height", "frame", "detections"],
        )
        for d in e["detections"]:
            assert list(d) == ["box", "score", "label", "name"]
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= e["width"] and 0 <= y1 <= y2 <= e["height"]
            assert d["score"] > 0.05 and d["name"] == SHAPES_CLASSES[d["label"] - 1]
    assert sum(len(e["detections"]) for e in entries) > 0

    # the JSON holds exactly what the Python API returns
    b_entry = next(e for e in images if e["image"].endswith("b.PNG"))
    api = Detector.from_checkpoint(tiny_ckpt, device="cpu", score_thresh=0.05)(b_entry["image"])
    assert (b_entry["width"], b_entry["height"]) == (60, 80)
    torch.testing.assert_close(torch.tensor([d["box"] for d in b_entry["detections"]]), api["boxes"], rtol=0, atol=1e-3)
    assert [d["label"] for d in b_entry["detections"]] == api["labels"].tolist()

    # drawn copies: out/<file name>; only the folder's a.jpg, whose name the single a.jpg shares, keeps its
    # path under out/<folder name>/; sizes kept
    drawn = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.suffix != ".json"}
    assert drawn == {"photos/a.jpg", "b.PNG", "c.jpeg", "a.jpg", "clip.mp4"}
    assert cv2.imread(str(out / "b.PNG")).shape == (80, 60, 3)
    frames_out = read_video(out / "clip.mp4")
    assert len(frames_out) == 5 and frames_out[0].shape == (64, 96, 3)


def test_exif_rotated_photo_is_predicted_upright(tiny, tiny_ckpt, tmp_path):
    from PIL import Image

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 140 wide x 90 high, shown turned 90 degrees clockwise
    Image.fromarray(random_image(90, 140, seed=5)).save(path, exif=exif.tobytes(), quality=95)
    shown = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)  # OpenCV applies the tag to JPEGs
    assert shown.shape == (140, 90, 3)
    assert_same_detections(tiny(str(path)), tiny(shown))
    out = tmp_path / "out"
    args = ["predict", "--weights", str(tiny_ckpt), str(path), "--out", str(out), "--json", str(out / "d.json")]
    assert main([*args, "--device", "cpu", "--score-thresh", "0.05"]) == 0
    (entry,) = json.loads((out / "d.json").read_text())
    assert (entry["width"], entry["height"]) == (90, 140)
    assert cv2.imread(str(out / "phone.jpg")).shape == (140, 90, 3)  # drawn upright, written untagged


def test_predict_all_good_exits_zero_and_bad_options_exit_two(tiny_ckpt, tmp_path, capsys):
    image = write_rgb(tmp_path / "x.jpg", random_image(64, 64, seed=0))
    assert main(["predict", "--weights", str(tiny_ckpt), str(image), "--device", "cpu"]) == 0
    assert main(["predict", "--weights", str(tiny_ckpt), str(image), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert main(["predict", "--weights", str(tmp_path / "none.pt"), str(image)]) == 2
    assert "none.pt: no such file" in capsys.readouterr().err


# --- drawing -------------------------------------------------------------------------------------


def test_class_colours_are_distinct_and_labels_are_drawn():
    colours = np.array([class_color(c) for c in range(1, 21)], np.float64)
    dist = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert dist[~np.eye(20, dtype=bool)].min() > 20  # 20 VOC classes, no two alike

    image = np.full((200, 300, 3), 255, np.uint8)
    boxes = np.array([[20, 40, 120, 150], [150, 30, 290, 190]], np.float32)
    out = draw_detections(image, boxes, np.array([0.9, 0.8]), np.array([1, 2]), ["cat", "dog"])
    assert (image == 255).all()  # input untouched
    for (x1, y1, _, y2), label in zip(boxes.astype(int), (1, 2), strict=True):
        assert (out[(y1 + y2) // 2, x1] == class_color(label)).all()  # box edge in the class colour
    tab = out[20:40, 20:80].reshape(-1, 3)  # the label tab above box 1: text in black or white on the class colour
    colour = np.array(class_color(1))
    text = (np.abs(tab.astype(int) - colour).sum(-1) > 60) & (tab.astype(int).sum(-1) < 3 * 255 - 60)
    assert text.sum() > 10


def test_highest_score_is_drawn_on_top():
    image = np.full((120, 160, 3), 255, np.uint8)
    boxes = np.array([[30, 40, 130, 110], [30, 40, 130, 110]], np.float32)  # two classes on one object
    names = ["cat", "d"]  # the higher-scored tab is the wider one, so it can cover the other entirely
    out = draw_detections(image, boxes, np.array([0.9, 0.6]), np.array([1, 2]), names)
    tab = out[20:40, 30:130].reshape(-1, 3)
    assert (tab == class_color(1)).all(-1).sum() > 100  # the cat tab's fill
    assert not (tab == class_color(2)).all(-1).any()  # the dog tab is under it
    assert (out[75, 30] == class_color(1)).all()  # so is the dog box's edge
    flipped = draw_detections(image, boxes[::-1], np.array([0.6, 0.9]), np.array([2, 1]), names)
    assert np.array_equal(flipped, out)  # the input order does not matter


def test_labels_stay_inside_the_image():
    image = np.zeros((60, 80, 3), np.uint8)
    out = draw_detections(
        image, np.array([[50, 0, 80, 30]], np.float32), np.array([0.5]), np.array([3]), ["a", "b", "long name"]
    )
    assert out[:, :40].any()  # the tab of a box at the right edge shifts left, inside the picture


def test_a_folders_drawn_copies_go_to_the_out_folder_by_file_name(tmp_path):
    """--out DIR/<file name>, not the input's folder path; a folder's path only where names would collide."""
    from ssd.commands.predict import collect_inputs

    for rel in ("photos/2024/trip/x.jpg", "photos/2024/y.png", "photos/z.jpg", "more/z.jpg", "more/w.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    items, problems = collect_inputs([str(tmp_path / "photos"), str(tmp_path / "more"), str(tmp_path / "more")])
    assert problems == []
    assert [i.out_name.as_posix() for i in items] == [
        "x.jpg",
        "y.png",
        "photos/z.jpg",  # z.jpg is in both folders: each keeps its folder's name
        "more/w.jpg",  # the same folder given twice: its names collide with themselves
        "more/z.jpg",
        "more/w_1.jpg",
        "more/z_1.jpg",
    ]
