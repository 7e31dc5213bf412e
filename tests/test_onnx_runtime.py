"""Exported models run where checkpoints run: the metadata round trip, ``ssd eval`` / ``Detector`` on an
``.onnx`` equal to the checkpoint's, fixed-batch graphs fed in chunks, graphs with NMS in them, ``ssd export
--int8`` detections overlapping the fp32 model's on a trained tiny model, and one line for each misuse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_dict

from ssd.bench.int8 import matched_fraction
from ssd.checkpoint import checkpoint_model_config, load_checkpoint
from ssd.cli import main
from ssd.config import Config, from_dict, to_dict
from ssd.data.dataset import read_image
from ssd.engine.train import train
from ssd.inference import Detector

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

NO_AUGMENT = {"photometric_p": 0, "channel_swap_p": 0, "expand_p": 0, "crop_min_ious": [None], "flip_p": 0}


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A tiny model that has learnt 8 shapes images (150 steps, no augmentation): ``(last.pt, config.yaml,
    its training images)``; confident detections to compare fp32 with int8 on. Read only."""
    root = shapes_data(8, 6, 64, 3, min_side=0.3, max_side=0.6, max_objects=2)
    out = tmp_path_factory.mktemp("onnx_run")
    cfg = tiny_run_dict(root, model={"priors": {"scales": [0.3, 0.5, 0.7, 0.9, 1.05]}}, max_iter=150, eval_period=150,
                        log_period=50, optimizer="adamw", lr=0.01)  # fmt: skip
    cfg["data"]["augment"] = NO_AUGMENT
    cfg["eval"]["train_sample"] = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSD_CACHE_DIR", str(out / "cache"))
        train(from_dict(Config, cfg), out / "run")
    images = sorted(str(p) for p in (root / "JPEGImages").glob("train_*.jpg"))
    return out / "run" / "last.pt", out / "run" / "config.yaml", images


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    """fp32 (batch 1, dynamic batch, NMS in the graph) and int8 exports of ``trained``. Read only."""
    last, _, _ = trained
    out = tmp_path_factory.mktemp("onnx")
    files = {"fp32": [], "dynamic": ["--dynamic-batch"], "nms": ["--nms"], "int8": ["--int8"]}
    for name, flags in files.items():
        assert main(["export", "--weights", str(last), "--out", str(out / f"{name}.onnx"), *flags]) == 0
    return {name: out / f"{name}.onnx" for name in files}


def test_the_metadata_carries_what_prediction_needs(trained, exported):
    import onnx

    ckpt = load_checkpoint(trained[0])
    for name, path in exported.items():
        meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props if p.key.startswith("ssd.")}
        assert meta["ssd.format"] == "ssd-onnx" and meta["ssd.classes"] == ckpt["classes"], name
        assert meta["ssd.model"] == to_dict(checkpoint_model_config(ckpt)), name
        assert meta["ssd.postprocess"] == ckpt["full_config"]["postprocess"], name  # the run's own settings
        assert meta["ssd.nms"] == (name == "nms") and meta["ssd.batch"] == (None if name == "dynamic" else 1), name
        assert ("ssd.int8" in meta) == (name == "int8"), name
    int8 = json.loads(next(p.value for p in onnx.load(str(exported["int8"])).metadata_props if p.key == "ssd.int8"))
    assert int8["calibration_images"] == 8 and int8["activations"] in ("uint8", "int8")  # all 8 training images


def test_ssd_eval_of_the_fp32_export_equals_the_checkpoints(trained, exported, tmp_path):
    last, config, _ = trained
    results = {}
    for name, weights in (("ckpt", last), ("fp32", exported["fp32"]), ("dynamic", exported["dynamic"])):
        args = ["eval", str(config), "--weights", str(weights), "--split", "train"]  # the 8 images it has learnt
        assert main([*args, "--json", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["ckpt"]["map"] > 0.9
    for name in ("fp32", "dynamic"):
        assert results[name]["map"] == pytest.approx(results["ckpt"]["map"], abs=1e-6), name
        assert results[name]["per_class"] == pytest.approx(results["ckpt"]["per_class"], abs=1e-6), name


def assert_same_detections(a: list[dict], b: list[dict], atol: float) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["labels"], y["labels"])
        torch.testing.assert_close(x["boxes"], y["boxes"], rtol=0, atol=atol)
        torch.testing.assert_close(x["scores"], y["scores"], rtol=0, atol=atol)


def test_detector_on_an_onnx_equals_the_checkpoint_and_feeds_fixed_batches_in_chunks(trained, exported):
    last, _, image_files = trained
    images = [read_image(p) for p in image_files[:5]]
    reference = Detector.from_checkpoint(last, device="cpu", score_thresh=0.1, batch_size=5)(images)
    assert sum(len(d["scores"]) for d in reference) >= 5
    for name in ("fp32", "dynamic"):  # batch 3 against a graph of batch 1: chunks of 1; dynamic: 3 then 2
        got = Detector.from_checkpoint(exported[name], device="cpu", score_thresh=0.1, batch_size=3)(images)
        assert_same_detections(got, reference, atol=1e-4)
        assert got[0]["names"] == reference[0]["names"]


def test_a_graph_with_nms_in_it_gives_the_same_top_detections(trained, exported):
    _, _, image_files = trained
    images = [read_image(p) for p in image_files]
    plain = Detector.from_onnx(exported["fp32"], score_thresh=0.3)(images)
    in_graph = Detector.from_onnx(exported["nms"], score_thresh=0.3)(images)
    # the in-graph NMS caps per class, ours per image: with few confident boxes both keep the same ones
    assert_same_detections(in_graph, plain, atol=1e-4)


def test_int8_detections_overlap_the_fp32_models(trained, exported):
    _, _, image_files = trained
    images = [read_image(p) for p in image_files]
    fp32 = Detector.from_onnx(exported["fp32"], score_thresh=0.05)(images)
    int8 = Detector.from_onnx(exported["int8"], score_thresh=0.05)(images)
    assert sum(int((d["scores"] >= 0.5).sum()) for d in fp32) >= 8  # the model is confident on its training images
    assert matched_fraction(fp32, int8) >= 0.9  # same label, IoU >= 0.9
    assert exported["int8"].stat().st_size < 0.5 * exported["fp32"].stat().st_size  # int8 weights


def test_int8_calibrates_on_a_folder_or_a_config(trained, tmp_path):
    last, config, image_files = trained
    folder = tmp_path / "calib"
    folder.mkdir()
    for p in image_files[:3]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    for calib in (folder, config):
        out = tmp_path / f"{Path(calib).stem}.onnx"
        args = ["export", "--weights", str(last), "--out", str(out), "--int8", "--calib", str(calib)]
        assert main([*args, "--calib-images", "4"]) == 0
        assert Detector.from_onnx(out)(read_image(image_files[0]))["boxes"].shape[1] == 4


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_misuse_gets_one_line_each(trained, exported, tmp_path, capsys):
    last, config, image_files = trained
    export = ["export", "--weights", str(last), "--out", str(tmp_path / "x.onnx"), "--int8"]
    assert main([*export, "--opset", "11"]) == 2
    assert error_line(capsys) == "ssd export: error: --int8 needs --opset >= 13 (per-channel int8 weights), got 11"
    assert main([*export, "--no-fuse"]) == 2
    assert "--int8 quantizes the convolutions with BatchNorm folded into them: drop --no-fuse" in error_line(capsys)
    stripped = tmp_path / "no_config.pt"
    ckpt = load_checkpoint(last)
    del ckpt["full_config"]
    torch.save(ckpt, stripped)
    assert main(["export", "--weights", str(stripped), "--out", str(tmp_path / "x.onnx"), "--int8"]) == 2
    assert error_line(capsys).startswith("ssd export: error: --int8 needs --calib (a config whose data.train")
    predict = ["predict", image_files[0], "--weights", str(exported["fp32"])]
    assert main([*predict, "--weights-kind", "raw"]) == 2
    assert "an exported model has one set of weights; --weights-kind is for checkpoints" in error_line(capsys)
    assert main([*predict, "--device", "cuda"]) == 2
    assert "runs on ONNX Runtime's CPU provider; --device cuda is for checkpoints" in error_line(capsys)
    assert main(["eval", str(config), "--weights", str(exported["fp32"]), "--weights-kind", "ema"]) == 2
    assert "--weights-kind is for checkpoints" in error_line(capsys)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter of the foreign file
def test_a_foreign_onnx_file_and_a_missing_onnxruntime(trained, tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.rand(1, 3, 8, 8),), str(foreign), dynamo=False)
    assert main(["predict", trained[2][0], "--weights", str(foreign)]) == 2
    assert error_line(capsys) == (
        f"ssd predict: error: {foreign}: an ONNX file without ssd's metadata (classes, preprocessing, priors); "
        "export it with ssd export, or run it with ONNX Runtime directly"
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main(["predict", trained[2][0], "--weights", str(foreign)]) == 2
    assert error_line(capsys) == (
        "ssd predict: error: running an .onnx model needs onnxruntime, which is not installed: pip install 'ssd[onnx]'"
    )
