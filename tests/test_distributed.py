"""Two-process DDP training on CPU (gloo), launched the way torchrun does it: one process per rank
with MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK in the environment, which
ssd.engine.distributed reads. Afterwards both ranks hold identical weights, BN statistics and
weights' average (train.ema)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import launch_ranks, tiny_run_dict

from ssd.checkpoint import load_checkpoint

SIZE = 64
MAX_ITER = 4

# Each rank trains through the real engine, then saves the weights it ended with (only rank 0
# writes the run's own files). Rank 1's loss is NaN at its NAN_AT-th step: every rank must skip it.
NAN_AT = 3
WORKER = """
import os, sys, torch
import ssd.engine.train as engine
from ssd.config import load_config

models, emas, calls = [], [], []
build_ssd, build_loss, build_ema = engine.build_ssd, engine.build_loss, engine.build_ema
engine.build_ssd = lambda cfg: models.append(build_ssd(cfg)) or models[-1]
engine.build_ema = lambda decay, model: emas.append(build_ema(decay, model)) or emas[-1]

def nan_on_rank_1(loss_cfg, model_cfg):
    criterion = build_loss(loss_cfg, model_cfg)
    def edited(*args):
        losses = criterion(*args)
        calls.append(None)
        if os.environ["RANK"] == "1" and len(calls) == NAN_AT:
            losses["loc"] = losses["loc"] * float("nan")
        return losses
    return edited

engine.build_loss = nan_on_rank_1
summary = engine.train(load_config(sys.argv[1]), sys.argv[2])
torch.save(models[0].state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
if emas[0] is not None:
    torch.save(emas[0].state_dict(), os.path.join(sys.argv[2], f"ema{os.environ['RANK']}.pt"))
print("summary", summary["iteration"], summary["best_map"])
""".replace("NAN_AT", str(NAN_AT))


def launch(world: int, args: list[str], tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Start ``world`` ranks of ``python -c WORKER args`` and wait for all of them."""
    return launch_ranks(world, ["-c", WORKER, *args], tmp_path)


def train_two_ranks(tmp_path: Path, shapes: Path, **train_options) -> Path:
    """The tiny run on 2 gloo ranks, SGD, a checkpoint every 2 steps; ``train_options`` override its ``train``."""
    options = {"max_iter": MAX_ITER, "optimizer": "sgd", "lr": 0.01, "warmup_iters": 1, "checkpoint_period": 2}
    cfg = tiny_run_dict(shapes, **{**options, **train_options})
    cfg["eval"]["batch_size"] = 4
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    results = launch(2, [str(tmp_path / "run.yaml"), str(tmp_path / "run")], tmp_path)
    for rank, res in enumerate(results):
        assert res.returncode == 0, f"rank {rank}:\n{res.stdout[-4000:]}"
    # rank 1 knew it was not the main process: it evaluated its shard but got no metrics back
    assert results[1].stdout.splitlines()[-1] == f"summary {MAX_ITER} -1.0"
    assert float(results[0].stdout.splitlines()[-1].split()[-1]) >= 0.0
    return tmp_path / "run"


@pytest.fixture(scope="module")
def shapes(shapes_data) -> Path:
    return shapes_data(40, 10, SIZE, 4)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, shapes) -> Path:
    """4 iterations of a global batch of 8 (4 per rank), precise BN over 2 batches, a final
    evaluation with predictions gathered from both ranks."""
    return train_two_ranks(tmp_path_factory.mktemp("ddp"), shapes, precise_bn_batches=2)


def test_without_precise_bn_every_rank_evaluates_and_saves_rank_0s_statistics_and_average(shapes, tmp_path, capsys):
    """After the last step each rank's BN statistics (and the average of the weights, train.ema) were moved
    by its own batch: the evaluation and the save use rank 0's on every rank, so the logged mAPs are the
    ones ssd eval gives last.pt's average and raw weights."""
    from ssd.cli import main

    run = train_two_ranks(tmp_path, shapes, ema=0.9)
    rank0, rank1 = (torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    statistics = [k for k in rank0 if k.endswith(("running_mean", "running_var"))]
    assert len(statistics) == 2 * 19 and all(torch.equal(rank0[k], rank1[k]) for k in statistics)
    saved = load_checkpoint(run / "last.pt")
    assert all(torch.equal(saved["model_raw"][k], rank0[k]) for k in statistics)
    ema0, ema1 = (torch.load(run / f"ema{r}.pt", weights_only=True) for r in (0, 1))
    assert saved["ema_updates"] == MAX_ITER  # rank 1's skipped step counts as an update
    for key, value in ema0.items():
        assert torch.equal(ema1[key], value) and torch.equal(saved["model"][key], value), key
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in logged if "map" in r]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' arithmetic (OMP_NUM_THREADS=1)
    try:
        args = ["eval", str(tmp_path / "run.yaml"), "--weights", str(run / "last.pt"), "--device", "cpu"]
        for kind, logged_map in (("ema", final["map_ema"]), ("raw", final["map_raw"])):
            assert main([*args, "--weights-kind", kind, "--json", str(tmp_path / f"{kind}.json")]) == 0
            assert json.loads((tmp_path / f"{kind}.json").read_text())["map"] == pytest.approx(logged_map, abs=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_ranks_end_with_identical_parameters(ddp_run):
    rank0 = torch.load(ddp_run / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_run / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key, value in rank0.items():
        if "running_" in key:  # precise BN averaged each rank's population statistics
            torch.testing.assert_close(rank1[key], value, rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert torch.equal(rank1[key], value), key  # DDP averaged the gradients: bit-identical steps
    saved = load_checkpoint(ddp_run / "last.pt")
    assert saved["iteration"] == MAX_ITER
    assert all(torch.equal(saved["model"][k], v) for k, v in rank0.items())
    assert all(bool(v == 2) for k, v in rank0.items() if k.endswith("num_batches_tracked"))  # precise BN: 2 batches
    # each rank saved its own random state (their streams differ after the model is built) and resumes from it
    rng = saved["rng"]["ranks"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_the_loss_is_finite_and_only_rank_0_writes(ddp_run):
    rows = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in losses] == list(range(1, MAX_ITER + 1))  # one row per iteration: rank 0's
    # rank 1's NaN loss skipped the step on both ranks (identical weights: test above);
    # the logged terms are the ranks' mean
    assert [r["skipped"] for r in losses] == [int(i == NAN_AT) for i in range(1, MAX_ITER + 1)]
    assert [r["loss"] is None for r in losses] == [i == NAN_AT for i in range(1, MAX_ITER + 1)]
    assert all(
        torch.isfinite(torch.tensor([r["loss"], r["loc"], r["conf"]])).all() for r in losses if r["loss"] is not None
    )
    (evaluation,) = [r for r in rows if "map" in r]
    assert evaluation["iter"] == MAX_ITER and 0.0 <= evaluation["map"] <= 1.0
    assert load_checkpoint(ddp_run / "best.pt")["iteration"] == MAX_ITER
    # .prev: the replaced last.pt
    names = [
        "best.pt",
        "config.yaml",
        "last.pt",
        "last.prev.pt",
        "metrics.jsonl",
        "rank0.pt",
        "rank1.pt",
        "report.json",
    ]
    if importlib.util.find_spec("matplotlib"):
        names.append("results.png")
    if importlib.util.find_spec("tensorboard"):
        names.append("tensorboard")
        assert len(list((ddp_run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's only
    assert sorted(p.name for p in ddp_run.iterdir()) == sorted(names)
