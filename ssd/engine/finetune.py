"""Fine-tuning: start a model from another checkpoint's weights (``model.init`` / ``model.init_backbone``)."""

from __future__ import annotations

import logging

from torch import nn

from ssd.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger("ssd.train")


def init_weights_from(model: nn.Module, path: str, backbone_only: bool) -> dict[str, list[str]]:
    """Load every tensor of ``path`` whose name and shape match the model; report the rest.

    Returns ``{"loaded": [...], "reinitialised": [...] (shape differs, e.g. a head with another
    class count), "ignored": [...] (not in the model)}``; all three are logged.
    """
    obj = load_checkpoint(path)
    state = obj["model"]
    own = model.state_dict()
    report = {"loaded": [], "reinitialised": [], "ignored": []}
    update = {}
    for key, value in state.items():
        if backbone_only and not key.startswith("backbone."):
            report["ignored"].append(key)
        elif key not in own:
            report["ignored"].append(key)
        elif own[key].shape != value.shape:
            report["reinitialised"].append(key)
        else:
            update[key] = value
            report["loaded"].append(key)
    if not any(v.is_floating_point() for v in update.values()):  # BN's num_batches_tracked counters always fit
        raise CheckpointError(f"{path}: no tensor matches this model by name and shape; is it the right architecture?")
    model.load_state_dict(update, strict=False)
    log.info("init from %s: loaded %d tensors, re-initialised %d (shape differs: %s), ignored %d (%s)",
             path, len(report["loaded"]), len(report["reinitialised"]), ", ".join(report["reinitialised"][:6]) or "-",
             len(report["ignored"]), ", ".join(report["ignored"][:6]) or "-")  # fmt: skip
    return report
