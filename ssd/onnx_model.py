"""Running an exported ``.onnx`` where a checkpoint runs: ``ssd predict``, ``ssd eval`` and ``Detector``.

``ssd export`` writes what prediction needs into the file's metadata (``metadata_props``, each value JSON):
``ssd.format``, ``ssd.classes``, ``ssd.model`` (the model config: preprocessing, priors and their variances,
input size), ``ssd.postprocess`` (score threshold, NMS, detections per image), ``ssd.nms`` (NMS in the
graph), ``ssd.batch`` (the graph's fixed batch, or null for a dynamic one) and, for an int8 model,
``ssd.int8`` (how it was calibrated).

:class:`OnnxSSD` stands in for the network: it takes the images resized to the input size as float
0..255 RGB (its :func:`graph_preprocess` makes the callers' normalisation the identity; the graph normalises
itself), runs ONNX Runtime's CPU provider in chunks of the graph's batch, and returns the graph's decoded
``boxes`` and ``scores`` (or, with NMS in the graph, its ``detections``), which
:class:`ssd.postprocess.PostProcessor` turns into detections as it does a checkpoint's outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ssd.config import ConfigError, ModelConfig, PostprocessConfig, PreprocessConfig, from_dict, to_dict

FORMAT = "ssd-onnx"
ONNX_SUFFIX = ".onnx"


def is_onnx(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ONNX_SUFFIX)


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(
            "running an .onnx model needs onnxruntime, which is not installed: pip install 'ssd[onnx]'"
        ) from None
    return onnxruntime


def check_onnx_options(path: str | os.PathLike, device: torch.device | str, weights_kind: str | None) -> None:
    """One line for the options an exported model cannot honour."""
    if weights_kind is not None:
        raise ValueError(f"{path}: an exported model has one set of weights; --weights-kind is for checkpoints")
    if str(device) not in ("auto", "cpu"):
        raise ValueError(f"{path}: an .onnx runs on ONNX Runtime's CPU provider; --device {device} is for checkpoints")


def export_metadata(
    model_cfg: ModelConfig, classes: list[str], post: PostprocessConfig, nms: bool, batch: int | None
) -> dict[str, Any]:
    """The ``ssd.*`` metadata of an exported model (values before JSON encoding)."""
    return {"format": FORMAT, "classes": list(classes), "model": to_dict(model_cfg), "postprocess": to_dict(post),
            "nms": nms, "batch": batch}  # fmt: skip


def write_metadata(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Add ``meta`` (:func:`export_metadata`, plus anything else) to the ONNX file at ``path``, in place."""
    import onnx

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if not p.key.startswith("ssd.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"ssd.{key}", json.dumps(value)
    onnx.save(model, str(path))


def read_metadata(session: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The ``ssd.*`` metadata of an open ONNX Runtime session; one line when the file is not ours."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get("ssd.format") != json.dumps(FORMAT):
        raise ValueError(
            f"{path}: an ONNX file without ssd's metadata (classes, preprocessing, priors); export it with "
            "ssd export, or run it with ONNX Runtime directly"
        )
    return {key.removeprefix("ssd."): json.loads(value) for key, value in props.items() if key.startswith("ssd.")}


def graph_preprocess(preprocess: PreprocessConfig) -> PreprocessConfig:
    """The callers' preprocessing for a graph that normalises itself: the same resize, no normalisation,
    so the graph gets the resized image as float 0..255 RGB."""
    return dataclasses.replace(preprocess, channel_order="rgb", pixel_scale=1.0, mean=[0.0] * 3, std=[1.0] * 3)


class OnnxSSD(nn.Module):
    """An exported SSD behind the network's interface: ``model(x)`` for ``x [B, 3, S, S]`` float 0..255 RGB
    -> ``{"boxes" [B, P, 4] normalised xyxy, "scores" [B, P, C]}``, or ``{"detections": [(boxes, scores,
    labels) per image]}`` with NMS in the graph. ``model_cfg``, ``classes``, ``postprocess`` and ``meta``
    come from the file."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.meta = read_metadata(self.session, path)
        try:
            self.model_cfg = from_dict(ModelConfig, self.meta["model"], "model")
            self.postprocess = from_dict(PostprocessConfig, self.meta["postprocess"], "postprocess")
        except (ConfigError, KeyError) as e:
            raise ValueError(f"{path}: bad ssd metadata: {e}") from None
        self.classes = list(self.meta["classes"])
        self.nms_in_graph = bool(self.meta.get("nms"))
        self.batch = self.meta.get("batch")  # None: any batch
        assert self.model_cfg.input_size is not None  # set by ModelConfig.__post_init__
        self.input_size = int(self.model_cfg.input_size)
        self.priors = None  # the graph decodes the boxes itself

    def forward(self, x: Tensor) -> dict[str, Any]:
        images = x.float().contiguous().cpu().numpy()
        step = self.batch or len(images)
        parts = []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            real = len(chunk)
            if real < step:  # a fixed-batch graph: pad the last chunk, drop the padding's outputs
                chunk = np.concatenate([chunk, np.zeros((step - real, *chunk.shape[1:]), np.float32)])
            parts.append((self.session.run(None, {"images": chunk}), real))
        if self.nms_in_graph:
            return {"detections": [d for outputs, real in parts for d in split_detections(outputs, real)]}
        boxes = torch.cat([torch.from_numpy(out[0][:real]) for out, real in parts])
        scores = torch.cat([torch.from_numpy(out[1][:real]) for out, real in parts])
        return {"boxes": boxes, "scores": scores}


def split_detections(outputs: list[np.ndarray], images: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """In-graph NMS outputs (``det_boxes``, ``det_scores``, ``det_labels``, ``det_batch``) -> per image."""
    boxes, scores, labels, batch = (torch.from_numpy(a) for a in outputs)
    return [(boxes[batch == i], scores[batch == i], labels[batch == i]) for i in range(images)]
