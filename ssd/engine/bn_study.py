"""The BatchNorm study (``scripts/bn_study.py``): train one detector several times, varying only BN.

Every variant uses the same config, seed, data and iteration count; only ``model.batch_norm`` and
``train.lr`` (a multiple of the config's) change. Outputs in the study folder:

- ``runs/<variant>/``: each training run (config.yaml, last.pt, best.pt, metrics.jsonl);
- ``loss.png`` (training loss vs iteration), ``map.png`` (validation mAP vs iteration);
- ``activations.png``: histograms of the values entering the ReLU of the last conv of each feature
  block (conv1..conv5, fc7, the first extra block), at the start (the init weights) and at the end
  (``last.pt``) of training, on one fixed batch of training images; one row per variant;
- ``summary.json`` (everything above as numbers) and ``summary.md`` (the table).

Reading order: :func:`run_study` prepares the data and the fixed batch, calls :func:`run_variant`
per variant, then :func:`summarize` and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ssd.checkpoint import load_checkpoint, load_state_strict
from ssd.config import BN_ALL, BN_BLOCKS, Config, DatasetConfig, load_config
from ssd.data.dataset import build_dataset, dataset_roots, stack_images
from ssd.data.shapes import SHAPES_CLASSES, ensure_shapes
from ssd.data.transforms import build_transforms, normalize_batch
from ssd.data.voc import read_split
from ssd.data.yolo import subset_lists
from ssd.demo import DEMO_DATA
from ssd.engine.train import TrainingError, init_weights_from, seed_everything, train
from ssd.model import build_ssd

log = logging.getLogger("ssd.bn_study")

BN_PRESETS = {"none": [], "all": list(BN_ALL), "backbone": [b for b in BN_ALL if b != "extras"], "extras": ["extras"]}
# no BN; BN everywhere; backbone only; extras only; and the lr sweep of the BN variant (1x is "all")
DEFAULT_VARIANTS = ["none", "all", "backbone", "extras", "all@3x", "all@10x"]
STUDY_DATA = dict(DEMO_DATA)  # generated when the config's data root is absent: the demo's shapes set
HIST_BINS = 60
HIST_SAMPLES = 100_000  # values kept per histogram (a fixed random subset)
REBOUND_NOTE = 1.3  # the table notes a loss that rose this much above its lowest point (stable runs: 1.05-1.25)


@dataclass
class Variant:
    """``blocks`` get BatchNorm; the run trains at ``lr_mult`` times the config's ``train.lr``."""

    name: str
    blocks: list[str]
    lr_mult: float = 1.0

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.name.replace("@", "_lr"))


def parse_variant(spec: str) -> Variant:
    """``BLOCKS[@MULTx]``: BLOCKS is a preset (``none``, ``all``, ``backbone`` = conv1..conv5 + fc,
    ``extras``) or a ``+``-joined list of BN blocks (``conv4+conv5``); ``@3x`` multiplies the lr."""
    blocks_spec, _, mult_spec = spec.strip().partition("@")
    if blocks_spec in BN_PRESETS:
        blocks = BN_PRESETS[blocks_spec]
    else:
        blocks = blocks_spec.split("+")
        bad = [b for b in blocks if b not in BN_BLOCKS]
        if bad or not blocks_spec:
            raise ValueError(f"variant {spec!r}: unknown BN block {bad[0] if bad else blocks_spec!r}; use a preset "
                             f"({', '.join(BN_PRESETS)}) or blocks among {', '.join(BN_BLOCKS)} joined by '+', "
                             "optionally followed by @MULTx, e.g. all@3x")  # fmt: skip
    lr_mult = 1.0
    if mult_spec:
        match = re.fullmatch(r"(\d+\.?\d*|\.\d+)x?", mult_spec)
        if not match or float(match.group(1)) <= 0:
            raise ValueError(f"variant {spec!r}: the lr multiplier after @ must be a positive number like 3x or 0.5x")
        lr_mult = float(match.group(1))
    return Variant(spec.strip(), [b for b in BN_BLOCKS if b in blocks], lr_mult)


# --- data ------------------------------------------------------------------------------------------


def ensure_study_data(cfg: Config) -> None:
    """Generate the shapes dataset at the config's data root when that root does not exist yet (as
    ``ssd demo`` does); any other missing dataset is an error naming the key."""
    ds = cfg.data.train
    if ds.format != "voc":
        return
    roots = dataset_roots(ds, "data.train")
    missing = [root for root, _ in roots if not Path(root).exists()]
    if not missing:
        return
    if len(roots) != 1 or list(ds.classes or []) != SHAPES_CLASSES:
        raise FileNotFoundError(f"data.train.root {missing[0]}: not found (only the synthetic shapes dataset is generated "
                                "when absent; point data.train at your data)")  # fmt: skip
    log.info("data.train.root %s is absent: generating the shapes dataset there (%s)", missing[0], STUDY_DATA)
    ensure_shapes(missing[0], **STUDY_DATA)


def val_subset(ds: DatasetConfig, num_images: int, out: Path) -> DatasetConfig:
    """``ds`` restricted to its first ``num_images`` images (0: all), without touching the data folder.

    VOC: a view folder per root under ``out`` with symlinked ``Annotations``/``JPEGImages`` and a
    shortened split file; COCO: a JSON with the first images of the file and their annotations;
    YOLO: a list file per root.
    """
    if num_images <= 0:
        return ds
    if ds.format == "coco":
        if not ds.annotations or not Path(ds.annotations).is_file():
            raise FileNotFoundError(f"data.val.annotations {ds.annotations}: COCO annotation file not found")
        data = json.loads(Path(ds.annotations).read_text())
        images = data.get("images", [])[:num_images]
        keep = {im["id"] for im in images}
        subset = dict(data, images=images, annotations=[a for a in data.get("annotations", []) if a["image_id"] in keep])
        out.mkdir(parents=True, exist_ok=True)
        path = out / "instances_val_subset.json"
        path.write_text(json.dumps(subset))
        return dataclasses.replace(ds, annotations=str(path))
    if ds.format == "yolo":
        roots, splits = subset_lists(dataset_roots(ds, "data.val"), num_images, out)
        return dataclasses.replace(ds, root=roots, split=splits)
    roots, splits, left = [], [], num_images
    for i, (root, split) in enumerate(dataset_roots(ds, "data.val")):
        if left <= 0:
            break
        root = Path(root).resolve()
        ids = read_split(root, split)[:left]
        left -= len(ids)
        view = out / f"view{i}"
        (view / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for folder in ("Annotations", "JPEGImages"):
            link = view / folder
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(root / folder, target_is_directory=True)
        (view / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        roots.append(str(view))
        splits.append(split)
    return dataclasses.replace(ds, root=roots, split=splits)


def fixed_batch(cfg: Config, num_images: int) -> Tensor:
    """The first ``num_images`` training images, resized only (no augmentation): uint8 ``[N, 3, S, S]``."""
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, cfg.model.input_size, train=False)
    dataset = build_dataset(cfg.data.train, transform, train=False, on_error="raise", key="data.train")
    n = min(num_images, len(dataset))
    if n < 2:
        raise ValueError(f"data.train has {len(dataset)} image(s); the activation histograms need at least 2 (BN batch statistics)")
    return stack_images([dataset[i]["image"] for i in range(n)])


# --- activations ------------------------------------------------------------------------------------


def activation_taps(model: nn.Module) -> dict[str, nn.Module]:
    """The ReLU after the last conv(+BN) of each feature block, by layer name (conv1_2 ... fc7, extras.0)."""
    backbone = model.backbone
    taps = {f"{block}_{len(getattr(backbone, block))}": getattr(backbone, block)[-1].relu for block in BN_BLOCKS[:5]}
    taps["fc7"] = backbone.fc7.relu
    if len(model.extras):
        taps["extras.0"] = model.extras[0][-1].relu
    return taps


@torch.no_grad()
def preactivations(model: nn.Module, images: Tensor, max_values: int = HIST_SAMPLES, seed: int = 0) -> dict[str, Tensor]:
    """Values entering each tapped ReLU (a fixed random subset of at most ``max_values``), float32 CPU.

    BN runs in train mode (batch statistics, as in training) and dropout is off; the model's
    running statistics move, so pass a throwaway model. The ReLUs are in-place: the pre-hook copies.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    values: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def record(module, inputs):
            x = inputs[0].detach().flatten().float().cpu()
            if x.numel() > max_values:
                x = x[torch.randint(x.numel(), (max_values,), generator=generator)]
            values[name] = x.clone()

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in activation_taps(model).items()]
    try:
        model.features(images)
    finally:
        for h in handles:
            h.remove()
    return values


def start_model(cfg: Config) -> nn.Module:
    """The weights ``train(cfg)`` starts from: the same seeding, then the same build and init files."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_ssd(cfg.model)
    if cfg.model.init_backbone:
        init_weights_from(model, cfg.model.init_backbone, backbone_only=True)
    if cfg.model.init:
        init_weights_from(model, cfg.model.init, backbone_only=False)
    return model


def histograms(start: dict[str, Tensor], end: dict[str, Tensor] | None) -> dict[str, dict]:
    """Per layer: shared bin edges over the 0.5-99.5 percentile range of start and end together, and
    for each phase the density counts, mean, std and the fraction passing the ReLU (> 0)."""
    out = {}
    for name, x0 in start.items():
        phases = {"start": x0} if end is None or name not in end else {"start": x0, "end": end[name]}
        finite = torch.cat([x[torch.isfinite(x)] for x in phases.values()])
        lo, hi = (torch.quantile(finite, torch.tensor([0.005, 0.995])).tolist() if finite.numel() else (-1.0, 1.0))
        if not hi > lo:
            lo, hi = lo - 1.0, hi + 1.0
        edges = torch.linspace(lo, hi, HIST_BINS + 1)
        cell = {"edges": [round(e, 6) for e in edges.tolist()]}
        for phase, values in phases.items():
            x = values[torch.isfinite(values)]
            counts = torch.histc(x, HIST_BINS, lo, hi) if x.numel() else torch.zeros(HIST_BINS)  # outside the range: dropped
            density = counts / max(1, x.numel()) / float(edges[1] - edges[0])  # the area shown = the share in range
            cell[phase] = {"density": [round(d, 6) for d in density.tolist()], "mean": float(x.mean()) if x.numel() else None,
                           "std": float(x.std()) if x.numel() > 1 else None, "positive": float((x > 0).float().mean()) if x.numel() else None,
                           "finite": x.numel() / max(1, values.numel())}  # fmt: skip
        out[name] = cell
    return out


# --- one run -----------------------------------------------------------------------------------------


# Variants are compared at equal iterations: a config's time limit (the CPU demo has one) would cut slow
# variants short and a time-driven schedule would make the lr depend on the machine's speed, so both are
# lifted (the study's overrides may set them again).
STUDY_DEFAULTS = ["train.time_limit=null", "train.schedule_by_time=false", "train.tensorboard=false"]


def variant_config(config_path, overrides: list[str], variant: Variant, base_lr: float, study: list[str], val: DatasetConfig) -> Config:
    blocks = f"[{', '.join(variant.blocks)}]" if variant.blocks else "none"
    cfg = load_config(config_path, [*STUDY_DEFAULTS, *overrides, *study, f"model.batch_norm={blocks}",
                                    f"train.lr={base_lr * variant.lr_mult!r}"])  # fmt: skip
    cfg.data.val = val
    return cfg


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """``(training rows, evaluation rows)`` of a run's metrics.jsonl (absent file: none). Training rows
    without a loss (every step of the window skipped for a non-finite loss) are left out."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if r.get("loss") is not None], [r for r in rows if "map" in r]


def throughput(train_rows: list[dict], batch_size: int) -> float | None:
    """Training images/s over the run, evaluation excluded (the engine's windows), without the first
    window (data-loader start-up)."""
    images = seconds = 0.0
    prev = train_rows[0]["iter"] if train_rows else 0
    for row in train_rows[1:]:
        n = (row["iter"] - prev) * batch_size
        prev = row["iter"]
        if row["images_per_s"] > 0:
            images += n
            seconds += n / row["images_per_s"]
    return images / seconds if seconds > 0 else None


def run_variant(cfg: Config, variant: Variant, out: Path, images: Tensor) -> dict:
    """Train ``cfg`` into ``out`` and measure it. A run stopped by :class:`TrainingError` (non-finite
    loss) is recorded as diverged, not raised."""
    log.info("variant %s: batch_norm %s, lr %g, %d iterations -> %s", variant.name, variant.blocks or "none",
             cfg.train.lr, cfg.train.max_iter, out)  # fmt: skip
    t0, started = time.perf_counter(), time.time()
    error, stopped = None, "diverged"
    try:
        stopped = train(cfg, out)["stopped"]
    except TrainingError as e:
        error = str(e)
        log.warning("variant %s diverged: %s", variant.name, e)
    if stopped == "signal":  # Ctrl-C / SIGTERM: the engine saved last.pt and returned; the study stops too
        raise KeyboardInterrupt(f"variant {variant.name} interrupted; its state is in {out / 'last.pt'}")
    wall = time.perf_counter() - t0
    train_rows, eval_rows = read_metrics(out / "metrics.jsonl")

    x = normalize_batch(images, cfg.model.preprocess)
    start = preactivations(start_model(cfg), x)
    end, end_iter = None, None
    if (out / "last.pt").is_file() and (out / "last.pt").stat().st_mtime >= started - 1:  # not a previous study's
        ckpt = load_checkpoint(out / "last.pt")
        model = build_ssd(cfg.model)
        load_state_strict(model, ckpt["model"], str(out / "last.pt"))
        end, end_iter = preactivations(model, x), int(ckpt.get("iteration", 0))

    losses = [r["loss"] for r in train_rows]
    loss_up = bool(losses) and (not math.isfinite(losses[-1]) or losses[-1] > losses[0])
    maps = [r["map"] for r in eval_rows]
    return {
        "name": variant.name,
        "batch_norm": variant.blocks,
        "lr": cfg.train.lr,
        "lr_mult": variant.lr_mult,
        "run_dir": str(out),
        "iterations": train_rows[-1]["iter"] if train_rows else 0,
        "stopped": stopped,  # done | time_limit (train.time_limit set) | diverged
        "final_map": maps[-1] if maps else None,
        "best_map": max(maps) if maps else None,
        "diverged": error is not None or loss_up,
        "error": error,
        "start_loss": losses[0] if losses else None,
        "end_loss": losses[-1] if losses else None,
        "images_per_s": throughput(train_rows, cfg.train.batch_size),
        "wall_s": wall,
        "loss_curve": {"iter": [r["iter"] for r in train_rows], "loss": losses},
        "map_curve": {"iter": [r["iter"] for r in eval_rows], "map": maps},
        "end_weights_iter": end_iter,
        "activations": histograms(start, end),
    }


# --- the study -----------------------------------------------------------------------------------------


def run_study(
    config_path: str | os.PathLike,
    out: str | os.PathLike,
    overrides: list[str] = (),
    variants: Sequence[str] = tuple(DEFAULT_VARIANTS),
    iters: int = 300,
    eval_period: int = 100,
    log_period: int = 5,
    batch_size: int | None = None,
    val_images: int = 100,
    act_images: int = 16,
) -> dict:
    """Run every variant and write the plots, ``summary.json`` and ``summary.md`` into ``out``.
    Returns the summary (see :func:`summarize`)."""
    t0 = time.perf_counter()
    for name, value, low in (("--iters", iters, 1), ("--eval-period", eval_period, 1), ("--log-period", log_period, 1),
                             ("--val-images", val_images, 0), ("--act-images", act_images, 2)):  # fmt: skip
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    _pyplot()  # before the training, not after it
    parsed = [parse_variant(v) for v in variants]
    if not parsed:
        raise ValueError("--variants: give at least one variant, e.g. none all all@3x")
    dirs = [v.dirname for v in parsed]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"--variants: duplicate variant in {list(variants)}")
    out = Path(out)
    overrides = list(overrides)
    study = [f"train.max_iter={iters}", f"train.eval_period={eval_period}", f"train.log_period={log_period}",
             f"train.checkpoint_period={eval_period}"]  # fmt: skip
    if batch_size is not None:
        study.append(f"train.batch_size={batch_size}")
    base = load_config(config_path, [*STUDY_DEFAULTS, *overrides, *study])
    ensure_study_data(base)
    out.mkdir(parents=True, exist_ok=True)
    val = val_subset(base.data.val, val_images, out / "val_subset")
    images = fixed_batch(base, act_images)

    results = []
    for variant in parsed:
        cfg = variant_config(config_path, overrides, variant, base.train.lr, study, val)
        results.append(run_variant(cfg, variant, out / "runs" / variant.dirname, images))
    summary = summarize(results, {
        "config": str(config_path), "overrides": overrides, "iters": iters, "batch_size": base.train.batch_size,
        "base_lr": base.train.lr, "optimizer": base.train.optimizer, "warmup_iters": base.train.warmup_iters,
        "seed": base.train.seed, "eval_period": eval_period, "val_images": val_images or None,
        "activation_images": len(images), "data": str(base.data.train.root), "torch_threads": torch.get_num_threads(),
    })  # fmt: skip
    summary["plots"] = write_plots(summary, out)
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(format_table(summary) + "\n")
    log.info("BN study done in %.0f s: %s", summary["wall_s"], out)
    return summary


def loss_rebound(curve: dict) -> tuple[float, int | None]:
    """The largest factor by which the logged loss rose above its lowest value so far, and the iteration
    of that peak: a spike while the warmup ramps the lr up means the lr is at the edge of stability."""
    worst, at, low = 1.0, None, math.inf
    for it, loss in zip(curve["iter"], curve["loss"]):
        if low < math.inf and loss / low > worst:
            worst, at = loss / low, it
        low = min(low, loss)
    return worst, at


def summarize(results: list[dict], settings: dict) -> dict:
    """Adds to every variant ``iters_to_90pct``, the first evaluated iteration at which it reached 90%
    of the best mAP of the whole study (None if never), and ``loss_rebound`` / ``loss_rebound_iter``
    (:func:`loss_rebound`)."""
    best = max((r["best_map"] for r in results if r["best_map"] is not None), default=None)
    for r in results:
        r["loss_rebound"], r["loss_rebound_iter"] = loss_rebound(r["loss_curve"])
        r["iters_to_90pct"] = None
        if best is not None and best > 0:
            hits = [it for it, m in zip(r["map_curve"]["iter"], r["map_curve"]["map"]) if m >= 0.9 * best]
            r["iters_to_90pct"] = hits[0] if hits else None
    return {"settings": settings, "study_best_map": best, "variants": results}


def format_table(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        f"BN study of `{s['config']}`: {s['iters']} iterations, batch {s['batch_size']}, {s['optimizer']} base lr "
        f"{s['base_lr']:g}, warmup {s['warmup_iters']}, seed {s['seed']}; mAP = VOC07 mAP@0.5 on "
        f"{s['val_images'] or 'all'} validation images; 90% of the study's best mAP ({_fmt(summary['study_best_map'])})",
        "",
        "| variant | BN blocks | lr | final mAP | best mAP | iterations to 90% of best | diverged | images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["variants"]:
        blocks = ", ".join(r["batch_norm"]) if r["batch_norm"] else "-"
        if r["batch_norm"] == BN_PRESETS["all"]:
            blocks = "all"
        diverged = ("yes (non-finite loss)" if r["error"] else "yes (loss rose)") if r["diverged"] else "no"
        if r["loss_rebound"] >= REBOUND_NOTE:
            diverged += f" (loss rebounded {r['loss_rebound']:.1f}x, iteration {r['loss_rebound_iter']})"
        to90 = str(r["iters_to_90pct"]) if r["iters_to_90pct"] is not None else "never"
        lines.append(f"| {r['name']} | {blocks} | {r['lr']:g} | {_fmt(r['final_map'])} | {_fmt(r['best_map'])} | {to90} | "
                     f"{diverged} | {_fmt(r['images_per_s'], 1)} |")  # fmt: skip
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --- plots -------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the BN study draws its plots with matplotlib: pip install 'ssd[plots]'") from None
    return plt


def write_plots(summary: dict, out: Path) -> dict[str, str]:
    """loss.png, map.png and activations.png from the summary's numbers; returns their file names."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    variants = summary["variants"]
    colors = {r["name"]: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(variants)}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in variants:
        c = r["loss_curve"]
        ax.plot(c["iter"], c["loss"], label=r["name"] + (" (diverged)" if r["diverged"] else ""), color=colors[r["name"]])
    ax.set(xlabel="iteration", ylabel="training loss (loc + conf)", yscale="log", title="Training loss per BN variant")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in variants:
        c = r["map_curve"]
        ax.plot(c["iter"], c["map"], marker="o", label=r["name"], color=colors[r["name"]])
    ax.set(xlabel="iteration", ylabel="VOC07 mAP@0.5", ylim=(0, 1), title="Validation mAP per BN variant")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "map.png", dpi=100)
    plt.close(fig)

    layers = list(variants[0]["activations"])
    fig, axes = plt.subplots(len(variants), len(layers), figsize=(2.1 * len(layers), 1.6 * len(variants) + 0.6), squeeze=False)
    for i, r in enumerate(variants):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            cell = r["activations"][layer]
            edges = cell["edges"]
            for phase, color in (("start", "tab:blue"), ("end", "tab:orange")):
                if phase in cell:
                    ax.stairs(cell[phase]["density"], edges, color=color, fill=phase == "start", alpha=0.45 if phase == "start" else 1)
            ax.axvline(0.0, color="black", lw=0.6)
            stds = "→".join(_fmt(cell[p]["std"], 2) for p in ("start", "end") if p in cell)
            ax.text(0.97, 0.95, f"std {stds}", transform=ax.transAxes, ha="right", va="top", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_yticks([])
            if i == 0:
                ax.set_title(layer, fontsize=9)
            if j == 0:
                ax.set_ylabel(r["name"], fontsize=9)
    fig.suptitle("Values entering each block's ReLU, on one fixed batch: start (blue, filled) and end (orange) of training",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "activations.png", dpi=80)
    plt.close(fig)
    return {"loss": "loss.png", "map": "map.png", "activations": "activations.png"}
