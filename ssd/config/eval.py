"""The test-time sections: ``postprocess`` (how the network's outputs become detections) and ``eval``
(how the detections on ``data.val`` are scored).

Evaluation, ``ssd predict`` and the ONNX export all decode with ``postprocess``. Every default of the
sections lives in these dataclasses; ``__post_init__`` checks values and names the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssd.config.io import ConfigError, check_choice


@dataclass
class PostprocessConfig:
    """Inference decoding (paper Sec. 3: score 0.01, NMS 0.45, 200 per image; torchvision top-k 400)."""

    score_threshold: float = 0.01  # per class, a prior's softmax score must exceed this
    nms_threshold: float = 0.45  # the IoU at which NMS (per class) suppresses the lower-scored box
    topk_candidates: int = 400  # per image and class, the highest-scored priors that go on to NMS
    detections_per_image: int = 200  # the best over all classes after NMS


@dataclass
class EvalConfig:
    """Scoring detections: the metric and the evaluation batch."""

    batch_size: int = 32  # images per forward pass (during training and ``ssd eval``, unless --batch-size)
    # training images (a fixed sample, evaluation's transforms) scored beside data.val at each evaluation of a
    # run, logged as train_sample_map: low on both is a data or capacity problem, far higher here overfits; 0: off
    train_sample: int = 200
    metric: str = "auto"  # voc07 | voc | coco | auto (voc07 for VOC data, coco for COCO data)
    # inclusive: +1 on widths/heights as the VOC devkit (official numbers) | continuous: no +1
    voc_pixel_convention: str = "inclusive"

    def __post_init__(self) -> None:
        check_choice("eval.metric", self.metric, ("auto", "voc07", "voc", "coco"))
        check_choice("eval.voc_pixel_convention", self.voc_pixel_convention, ("inclusive", "continuous"))
        if self.train_sample < 0:
            raise ConfigError(f"eval.train_sample must be >= 0 (0: off), got {self.train_sample}")
