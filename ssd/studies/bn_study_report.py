"""The BN study's results: the per-variant summary, its markdown table and the plots (loss, mAP,
activations, and final mAP against lr per BN placement)."""

from __future__ import annotations

import math
from pathlib import Path

from ssd.config import BN_ALL

REBOUND_NOTE = 1.3  # the table notes a loss that rose this much above its lowest point (stable runs: 1.05-1.25)
BACKBONE = [b for b in BN_ALL if b != "extras"]  # conv1..conv5 + fc


def blocks_label(blocks: list[str]) -> str:
    """The BN blocks in the study's words: ``-`` (none), ``all``, ``backbone``, ``all+heads``, or the list."""
    if not blocks:
        return "-"
    for preset, members in (("all", list(BN_ALL)), ("backbone", BACKBONE)):
        if blocks[: len(members)] == members:
            return "+".join([preset, *blocks[len(members) :]])
    return "+".join(blocks)


def loss_rebound(curve: dict) -> tuple[float, int | None]:
    """The largest factor by which the logged loss rose above its lowest value so far, and the iteration
    of that peak: a spike while the warmup ramps the lr up means the lr is at the edge of stability."""
    worst, at, low = 1.0, None, math.inf
    for it, loss in zip(curve["iter"], curve["loss"], strict=True):
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
            hits = [it for it, m in zip(r["map_curve"]["iter"], r["map_curve"]["map"], strict=True) if m >= 0.9 * best]
            r["iters_to_90pct"] = hits[0] if hits else None
    return {"settings": settings, "study_best_map": best, "variants": results}


def format_table(summary: dict) -> str:
    s = summary["settings"]
    optimizer = s["optimizer"] + (f" (momentum {s['momentum']:g})" if s["optimizer"] == "sgd" else "")
    lines = [
        f"BN study of `{s['config']}`: {s['iters']} iterations, batch {s['batch_size']}, {optimizer}, "
        f"base lr {s['base_lr']:g}, weight decay {s['weight_decay']:g}, warmup {s['warmup_iters']}, "
        f"seed {s['seed']}; mAP = VOC07 mAP@0.5 on {s['val_images'] or 'all'} validation images; "
        f"90% of the study's best mAP ({_fmt(summary['study_best_map'])})",
        "",
        "| variant | BN blocks | optimizer | lr | final mAP | best mAP "
        "| iterations to 90% of best | diverged | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["variants"]:
        diverged = f"**yes** ({r['diverged_reason']})" if r["diverged"] else "no"
        if r["loss_rebound"] >= REBOUND_NOTE:
            # a blow-up: 2e+29x
            factor = f"{r['loss_rebound']:.1f}" if r["loss_rebound"] < 1000 else f"{r['loss_rebound']:.0e}"
            diverged += f" (loss rebounded {factor}x, iteration {r['loss_rebound_iter']})"
        to90 = str(r["iters_to_90pct"]) if r["iters_to_90pct"] is not None else "never"
        lines.append(
            f"| {r['name']} | {blocks_label(r['batch_norm'])} | {r['optimizer']} | {r['lr']:g} "
            f"| {_fmt(r['final_map'])} | {_fmt(r['best_map'])} | {to90} | {diverged} | {_fmt(r['images_per_s'], 1)} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --- plots -------------------------------------------------------------------------------------------


def require_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the BN study draws its plots with matplotlib: pip install 'ssd[plots]'") from None
    return plt


def _styles(variants: list[dict], plt) -> dict[str, dict]:
    """One colour per BN placement, one line style per lr within it (lowest lr solid)."""
    groups: dict[str, list[dict]] = {}
    for r in variants:
        groups.setdefault(blocks_label(r["batch_norm"]), []).append(r)
    styles = {}
    for i, members in enumerate(groups.values()):
        lrs = sorted({r["lr"] for r in members})
        for r in members:
            dash = ("-", "--", ":", "-.")[lrs.index(r["lr"]) % 4]
            styles[r["name"]] = {"color": plt.get_cmap("tab10")(i % 10), "linestyle": dash}
    return styles


def _label(r: dict) -> str:
    return f"{r['name']} ({r['optimizer']} lr {r['lr']:g})" + (" DIVERGED" if r["diverged"] else "")


def sweep_map(r: dict) -> float:
    """The mAP a variant shows in the lr sweep: its final mAP; 0 for a run stopped on non-finite losses
    (whatever it scored before it blew up is not what that lr trains to)."""
    return 0.0 if r["error"] or r["final_map"] is None else r["final_map"]


def write_plots(summary: dict, out: Path) -> dict[str, str]:
    """loss.png, map.png, activations.png and lr_sweep.png from the summary's numbers; returns their file names."""
    plt = require_pyplot()
    variants = summary["variants"]
    styles = _styles(variants, plt)
    _line_plot(plt, variants, styles, "loss_curve", "loss", out / "loss.png")
    _line_plot(plt, variants, styles, "map_curve", "map", out / "map.png")
    _activations_plot(plt, variants, out / "activations.png")
    _lr_sweep_plot(plt, summary, styles, out / "lr_sweep.png")
    return {"loss": "loss.png", "map": "map.png", "activations": "activations.png", "lr_sweep": "lr_sweep.png"}


def _line_plot(plt, variants: list[dict], styles: dict, curve: str, key: str, path: Path) -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # a loss that blew up (1e30) before the run stopped would flatten every other curve: the loss axis
    # shows the runs that finished in full and clips the stopped ones
    finished = [v for r in variants if not r["error"] for v in r[curve][key] if math.isfinite(v)]
    every = [v for r in variants for v in r[curve][key] if math.isfinite(v)]
    top = 1.5 * max(finished or every or [1.0])
    bottom = 0.8 * min(every or [1.0])
    for r in variants:
        c = r[curve]
        ax.plot(c["iter"], c[key], label=_label(r), marker="o" if key == "map" else None, **styles[r["name"]])
        if key == "loss" and r["error"] and c["iter"]:  # stopped on non-finite losses: mark where
            y = c[key][-1] if math.isfinite(c[key][-1]) else top
            ax.plot(c["iter"][-1], min(y, top), marker="x", markersize=9, color=styles[r["name"]]["color"])
    if key == "loss":
        ax.set(
            xlabel="iteration",
            ylabel="training loss (loc + conf)",
            yscale="log",
            title="Training loss per BN variant (x: stopped, non-finite loss)",
        )
        ax.set_ylim(bottom, top)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set(xlabel="iteration", ylabel="VOC07 mAP@0.5", ylim=(0, 1), title="Validation mAP per BN variant")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lr_sweep_plot(plt, summary: dict, styles: dict, path: Path) -> None:
    """Final mAP (left) and final training loss (right, log axis) against lr (log axis), one line per BN
    placement; diverged runs as crosses, a run stopped on non-finite losses at mAP 0 and at the top of
    the loss axis. The loss panel tells the lrs apart where short runs leave every mAP near 0."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    groups: dict[str, list[dict]] = {}
    for r in summary["variants"]:
        groups.setdefault(blocks_label(r["batch_norm"]), []).append(r)
    finite = [
        r["end_loss"]
        for r in summary["variants"]
        if not r["error"] and r["end_loss"] is not None and math.isfinite(r["end_loss"])
    ]
    top = 2 * max(finite, default=10.0)  # where the stopped runs sit on the loss axis
    fig, (ax_map, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, members in groups.items():
        members = sorted(members, key=lambda r: r["lr"])
        color = styles[members[0]["name"]]["color"]
        lrs = [r["lr"] for r in members]
        losses = [top if r["error"] or r["end_loss"] is None else r["end_loss"] for r in members]
        for ax, ys in ((ax_map, [sweep_map(r) for r in members]), (ax_loss, losses)):
            ax.plot(lrs, ys, color=color, label=f"BN: {'none' if label == '-' else label}")
            for r, y in zip(members, ys, strict=True):
                ax.plot(
                    r["lr"],
                    y,
                    marker="x" if r["diverged"] else "o",
                    markersize=9 if r["diverged"] else 6,
                    color=color,
                    linestyle="none",
                )
    optimizers = ", ".join(sorted({r["optimizer"] for r in summary["variants"]}))
    best = max((sweep_map(r) for r in summary["variants"]), default=0.0)
    ax_map.set(
        ylabel="final VOC07 mAP@0.5",
        ylim=(0, min(1.0, max(0.1, 1.15 * best))),
        title="Final validation mAP (x: diverged)",
    )
    ax_loss.set(
        ylabel="last logged training loss", yscale="log", title="Final training loss (x: diverged; top: stopped)"
    )
    ax_loss.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_loss.yaxis.set_minor_formatter(NullFormatter())
    for ax in (ax_map, ax_loss):
        ax.set(xscale="log", xlabel=f"learning rate ({optimizers})")
        ax.grid(True, which="both", alpha=0.3)
    ax_map.legend(fontsize=8)
    fig.suptitle(f"After {summary['settings']['iters']} iterations, by lr and BN placement", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _activations_plot(plt, variants: list[dict], path: Path) -> None:
    layers = list(variants[0]["activations"])
    fig, axes = plt.subplots(
        len(variants), len(layers), figsize=(2.1 * len(layers), 1.6 * len(variants) + 0.6), squeeze=False
    )
    for i, r in enumerate(variants):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            cell = r["activations"].get(layer)
            if cell is None:
                ax.set_axis_off()
                continue
            edges = cell["edges"]
            for phase, color in (("start", "tab:blue"), ("end", "tab:orange")):
                if phase in cell:
                    ax.stairs(
                        cell[phase]["density"],
                        edges,
                        color=color,
                        fill=phase == "start",
                        alpha=0.45 if phase == "start" else 1,
                    )
            ax.axvline(0.0, color="black", lw=0.6)
            stds = "→".join(_fmt(cell[p]["std"], 2) for p in ("start", "end") if p in cell)
            ax.text(0.97, 0.95, f"std {stds}", transform=ax.transAxes, ha="right", va="top", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_yticks([])
            if i == 0:
                ax.set_title(layer + (" (logits)" if layer.startswith("conf") else ""), fontsize=9)
            if j == 0:
                ax.set_ylabel(
                    f"{r['name']}\n{r['optimizer']} {r['lr']:g}" + ("\nDIVERGED" if r["diverged"] else ""), fontsize=8
                )
    fig.suptitle(
        "Values entering each block's ReLU, and the first conf head's logits, on one fixed batch: start (blue, "
        "filled) and end (orange) of training",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
