"""ssd.data.loader and collate: padded batches, the epoch-encoding sampler (shuffling, sharding,
padding), and DataLoader workers reproducing single-process augmentation exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd.config import load_config
from ssd.data.dataset import DetectionDataset, collate, sample_seed
from ssd.data.loader import EpochIndexSampler, build_dataloader, passes_for_batch
from ssd.data.records import Problems
from ssd.data.shapes import SHAPES_CLASSES, generate_shapes
from ssd.data.transforms import build_transforms
from ssd.data.voc import index_voc

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes_tiny.yaml"
SIZE = 96
NUM_TRAIN, NUM_VAL = 16, 7


@pytest.fixture(scope="module")
def shapes_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, NUM_TRAIN, NUM_VAL, size=SIZE, seed=2)
    return out


# --- collate --------------------------------------------------------------------------------------


def sample(value: int, boxes: list, labels: list, image_id: str) -> dict:
    return {
        "image": np.full((8, 8, 3), value, np.uint8),
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64),
        "image_id": image_id,
        "orig_size": (50 + value, 60),
    }


def test_collate_pads_targets_with_label_zero():
    a = sample(1, [[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.4, 0.9]], [3, 1], "a")
    b = sample(2, [], [], "b")
    c = sample(3, [[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.6, 0.6], [0.1, 0.2, 0.3, 0.4]], [2, 2, 4], "c")
    batch = collate([a, b, c])
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (3, 3, 8, 8)
    assert batch["images"][:, :, 0, 0].tolist() == [[1] * 3, [2] * 3, [3] * 3]
    assert batch["boxes"].dtype == torch.float32 and batch["boxes"].shape == (3, 3, 4)
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == [[3, 1, 0], [0, 0, 0], [2, 2, 4]]
    torch.testing.assert_close(batch["boxes"][0, :2], torch.tensor(a["boxes"]), rtol=0, atol=0)
    torch.testing.assert_close(batch["boxes"][2], torch.tensor(c["boxes"]), rtol=0, atol=0)
    assert batch["boxes"][0, 2].tolist() == [0.0] * 4 and batch["boxes"][1].abs().sum() == 0
    assert batch["image_ids"] == ["a", "b", "c"]
    assert batch["orig_sizes"] == [(51, 60), (52, 60), (53, 60)]
    assert batch["errors"] == []


def test_collate_of_images_without_objects_and_of_errors_only():
    batch = collate([sample(1, [], [], "a"), sample(2, [], [], "b")])
    assert batch["boxes"].shape == (2, 1, 4) and batch["labels"].tolist() == [[0], [0]]  # G >= 1
    batch = collate([{"error": "x.jpg: empty file", "image_id": "x"}, {"error": "y.jpg: empty file", "image_id": "y"}])
    assert batch["images"].shape[0] == 0 and batch["boxes"].shape[0] == 0 and batch["labels"].shape[0] == 0
    assert batch["image_ids"] == [] and batch["errors"] == ["x.jpg: empty file", "y.jpg: empty file"]


# --- EpochIndexSampler -------------------------------------------------------------------------------


def test_train_sampler_shuffles_each_epoch_differently_and_covers_every_index():
    n = 20
    sampler = EpochIndexSampler(n, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        encoded = list(sampler)
        assert len(encoded) == len(sampler) == n
        assert all(epoch * n <= i < (epoch + 1) * n for i in encoded)  # epoch * n + index
        order = [i - epoch * n for i in encoded]
        assert sorted(order) == list(range(n))
        orders.append(order)
    assert orders[0] != list(range(n))
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    again = EpochIndexSampler(n, shuffle=True, seed=3)
    again.set_epoch(1)
    assert [i - n for i in again] == orders[1]  # a function of (seed, epoch) only
    assert list(EpochIndexSampler(n, shuffle=True, seed=4)) != orders[0]


def test_eval_sampler_is_ordered_and_encodes_the_epoch():
    sampler = EpochIndexSampler(5, shuffle=False)
    assert list(sampler) == [0, 1, 2, 3, 4]
    sampler.set_epoch(2)
    assert list(sampler) == [10, 11, 12, 13, 14]


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (7, 2)])
def test_shuffled_shards_are_disjoint_and_padded_to_equal_length(n, world):
    shards = []
    for rank in range(world):
        sampler = EpochIndexSampler(n, shuffle=True, seed=5, rank=rank, world=world)
        sampler.set_epoch(1)
        shard = [i - n for i in sampler]
        assert len(shard) == len(sampler) == -(-n // world)
        shards.append(shard)
    single = EpochIndexSampler(n, shuffle=True, seed=5)
    single.set_epoch(1)
    permutation = [i - n for i in single]
    interleaved = [shards[r][k] for k in range(len(shards[0])) for r in range(world)]  # undo order[rank::world]
    assert interleaved[:n] == permutation  # every rank cuts the same permutation
    pad = len(interleaved) - n
    assert interleaved[n:] == permutation[:pad]  # the only repeats are the padding
    assert pad < world
    if pad == 0:
        assert set().union(*map(set, shards)) == set(range(n)) and sum(map(len, shards)) == n


@pytest.mark.parametrize("n, world", [(10, 3), (2, 4)])
def test_eval_shards_see_every_image_exactly_once(n, world):
    shards = [list(EpochIndexSampler(n, shuffle=False, rank=rank, world=world)) for rank in range(world)]
    assert shards[0] == list(range(0, n, world))  # in order, unpadded
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(s) for s in shards] == [len(EpochIndexSampler(n, False, rank=r, world=world)) for r in range(world)]


@pytest.mark.parametrize("n, world", [(1, 4), (3, 8)])
def test_shuffled_shards_keep_equal_length_when_there_are_more_ranks_than_images(n, world):
    for rank in range(world):
        sampler = EpochIndexSampler(n, shuffle=True, rank=rank, world=world)
        assert len(list(sampler)) == len(sampler) == 1


@pytest.mark.parametrize(
    "share, batch, passes", [(12, 16, 4), (8, 16, 2), (13, 16, 16), (16, 16, 1), (20, 16, 1), (1, 4, 4)]
)
def test_passes_fill_whole_batches_only_when_a_share_is_smaller_than_one(share, batch, passes):
    assert passes_for_batch(share, batch) == passes
    assert passes == 1 or share * passes % batch == 0


def test_a_sampler_epoch_of_several_passes_shuffles_each_pass_as_its_own_epoch():
    n, passes = 6, 3
    sampler = EpochIndexSampler(n, shuffle=True, seed=3, passes=passes)
    single = EpochIndexSampler(n, shuffle=True, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        encoded = list(sampler)
        assert len(encoded) == len(sampler) == n * passes
        expected = []
        for p in range(passes):  # pass p of epoch e is the single-pass sampler's epoch e * passes + p
            single.set_epoch(epoch * passes + p)
            expected += list(single)
        assert encoded == expected
        assert len(set(encoded)) == n * passes  # each (pass, image) has its own augmentation seed
        assert sorted(i % n for i in encoded) == sorted(list(range(n)) * passes)
    sampler.skip = 4  # a resume mid-epoch skips into the passes
    assert list(sampler) == encoded[4:]


# --- DataLoader --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_dataset(shapes_tree, tmp_path_factory) -> DetectionDataset:
    cfg = load_config(CONFIG)
    records = index_voc(shapes_tree, "train", SHAPES_CLASSES, Problems("raise"), use_cache=False)
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, SIZE, train=True)
    return DetectionDataset(records, SHAPES_CLASSES, transform, train=True)


def epoch_batches(dataset: DetectionDataset, num_workers: int, epoch: int) -> list[dict]:
    loader = build_dataloader(dataset, batch_size=4, train=True, num_workers=num_workers, seed=11, distributed=False)
    loader.sampler.set_epoch(epoch)
    return list(loader)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["image_ids"] == y["image_ids"]
        assert torch.equal(x["images"], y["images"])
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])


def test_workers_give_the_same_augmented_batches_and_epochs_differ(train_dataset):
    serial = epoch_batches(train_dataset, 0, epoch=0)
    assert len(serial) == NUM_TRAIN // 4
    for batch in serial:
        assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, SIZE, SIZE)
        assert batch["boxes"].min() >= 0 and batch["boxes"].max() <= 1
        real = batch["labels"] > 0
        assert batch["labels"].max() <= len(SHAPES_CLASSES)
        wh = batch["boxes"][..., 2:] - batch["boxes"][..., :2]
        assert (wh[real] > 0).all() and (batch["boxes"][~real] == 0).all()
        assert batch["errors"] == []
    assert sorted(i for b in serial for i in b["image_ids"]) == [r.image_id for r in train_dataset.records]

    assert_same_batches(serial, epoch_batches(train_dataset, 2, epoch=0))

    # the batch is the samples of (seed, epoch, index) whatever process made them
    sampler = EpochIndexSampler(NUM_TRAIN, shuffle=True, seed=11)
    first = list(sampler)[:4]
    assert_same_batches(serial[:1], [collate([train_dataset[i] for i in first])])
    assert sample_seed(11, 0, 3) != sample_seed(11, 1, 3) != sample_seed(12, 0, 3)

    later = epoch_batches(train_dataset, 2, epoch=1)
    by_id = [
        {i: img for b in batches for i, img in zip(b["image_ids"], b["images"], strict=True)}
        for batches in (serial, later)
    ]
    assert by_id[0].keys() == by_id[1].keys()
    assert all(not torch.equal(by_id[0][i], by_id[1][i]) for i in by_id[0])  # new augmentation every epoch
    assert [b["image_ids"] for b in later] != [b["image_ids"] for b in serial]


def test_eval_loader_keeps_order_and_the_last_partial_batch(shapes_tree):
    records = index_voc(shapes_tree, "val", SHAPES_CLASSES, Problems("raise"))
    cfg = load_config(CONFIG)
    transform = build_transforms(cfg.data.augment, cfg.model.preprocess, 64, train=False)
    loader = build_dataloader(DetectionDataset(records, SHAPES_CLASSES, transform), 3, train=False, num_workers=0)
    batches = list(loader)
    assert [len(b["image_ids"]) for b in batches] == [3, 3, 1]
    assert [i for b in batches for i in b["image_ids"]] == [r.image_id for r in records]
    assert batches[0]["orig_sizes"] == [(SIZE, SIZE)] * 3
    # eval boxes are the annotation boxes scaled to [0, 1]
    np.testing.assert_allclose(
        batches[0]["boxes"][0, : len(records[0].boxes)].numpy(), records[0].boxes / SIZE, atol=1e-6
    )


class StampNiceness:
    """A transform that writes the process's nice value into every pixel (where the sample was made)."""

    def __call__(self, image, boxes, labels):
        return np.full((8, 8, 3), os.nice(0), np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="os.nice is Unix-only")
def test_worker_nice_lowers_only_the_workers_priority(shapes_tree):
    records = index_voc(shapes_tree, "val", SHAPES_CLASSES, Problems("raise"))
    before = os.nice(0)
    loader = build_dataloader(
        DetectionDataset(records, SHAPES_CLASSES, StampNiceness()), 4, train=False, num_workers=1, worker_nice=5
    )
    stamps = torch.cat([b["images"].flatten() for b in loader]).unique().tolist()
    assert stamps == [min(19, before + 5)]
    assert os.nice(0) == before  # the training process keeps its priority
    plain = build_dataloader(DetectionDataset(records, SHAPES_CLASSES, StampNiceness()), 4, train=False, num_workers=1)
    assert torch.cat([b["images"].flatten() for b in plain]).unique().tolist() == [before]


WORKER_SIGNALS = """
import json, os, subprocess, sys, time
from ssd.data.loader import build_dataloader

class Pids:  # every sample is the pid of the process that made it
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return os.getpid()

LOADER = build_dataloader(Pids(), 1, train=False, num_workers=2, collate_fn=lambda samples: samples[0])
BATCHES = iter(LOADER)
pids = sorted({next(BATCHES) for _ in range(4)})  # the workers take turns: both have started
for sig in ("SIGINT", "SIGTERM"):  # from another process, as a signal to the process group comes
    for pid in pids:
        subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({pid}, signal.{sig})"], check=True)
time.sleep(0.5)
print(json.dumps([pids, sorted({next(BATCHES) for _ in range(4)})]), flush=True)
# ends with the loader alive: multiprocessing's exit terminate()s the workers and waits for them
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigwaitinfo"), reason="Unix signals")
def test_workers_ignore_stop_signals_from_others_and_end_with_their_owner(tmp_path):
    """A SIGINT / SIGTERM to the process group is the main process's to handle: the workers go on
    serving batches; a process that exits with its loader alive does not hang (its own terminate())."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", WORKER_SIGNALS], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    before, after = json.loads(done.stdout)
    assert len(before) == 2 and after == before  # the same two workers, still serving
    if Path("/proc/self").exists():
        assert not [pid for pid in before if Path(f"/proc/{pid}").exists()]  # ended and reaped with their owner


def test_num_workers_left_unset_follows_the_machine_and_a_set_value_is_kept(monkeypatch):
    from ssd.config import Config
    from ssd.data.loader import MAX_AUTO_WORKERS, default_num_workers

    cpus = len(os.sched_getaffinity(0))
    assert Config().data.num_workers is None  # unset by default
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers(None) == max(1, min(MAX_AUTO_WORKERS, cpus))
    assert default_num_workers(0) == 0 and default_num_workers(5) == 5
    # torchrun: the CPUs are shared by the processes on this machine, at least one worker each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_num_workers(None) == max(1, min(MAX_AUTO_WORKERS, cpus // 2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cpus))
    assert default_num_workers(None) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers(None) == MAX_AUTO_WORKERS
