"""tandem.workloads: partitioners, the shard loader, the bundled datasets and models."""

from __future__ import annotations

import gzip
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem.config import WorkloadConfig
from tandem.errors import CheckpointError, ConfigError, DataError
from tandem.workloads import (
    WORKLOADS,
    ArrayDataset,
    ShardLoader,
    Workload,
    build_workload,
    cyclic_allocation,
    partition,
    partition_indices,
)
from tandem.workloads import fashion as fashion_mod
from tandem.workloads.idx import read_idx, write_idx
from tandem.workloads.models import ResNet18, SmallCNN, count_parameters


@pytest.fixture(scope="module")
def digits() -> Workload:
    return build_workload(WorkloadConfig(name="digits"), seed=0)


def _as_counts(shards: list[torch.Tensor], n: int) -> torch.Tensor:
    return torch.bincount(torch.cat(shards), minlength=n)


# ---- partitioners ----------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [1, 3, 4, 7])
def test_iid_covers_every_index_once(digits: Workload, parts: int) -> None:
    shards = partition(digits.train.y, parts, "iid", seed=3)
    n = len(digits.train)
    assert len(shards) == parts
    assert all(s.dtype == torch.long for s in shards)
    assert torch.equal(_as_counts(shards, n), torch.ones(n, dtype=torch.long))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(torch.equal(a, b) for a, b in
               zip(shards, partition(digits.train.y, parts, "iid", seed=3), strict=True))
    if parts > 1:
        assert not torch.equal(shards[0], partition(digits.train.y, parts, "iid", seed=4)[0])


@pytest.mark.parametrize(("parts", "lpw"), [(5, 2), (10, 1), (10, 3), (8, 2), (4, 2)])
def test_label_scheme_limits_classes_per_worker(digits: Workload, parts: int, lpw: int) -> None:
    y = digits.train.y
    shards = partition(y, parts, "label", labels_per_worker=lpw, seed=1)
    # every sample used exactly once
    assert torch.equal(_as_counts(shards, len(y)), torch.ones(len(y), dtype=torch.long))
    classes = [len(torch.unique(y[s])) for s in shards]
    uneven = parts * lpw < 10  # fewer slots than classes: some worker must take one more
    assert max(classes) <= lpw + (1 if uneven else 0), classes
    assert min(len(s) for s in shards) > 0


def test_label_scheme_on_regression_targets_is_skewed() -> None:
    y = torch.randn(400, 1, generator=torch.Generator().manual_seed(0))
    shards = partition(y, 4, "label", labels_per_worker=1, seed=0)
    assert torch.equal(_as_counts(shards, 400), torch.ones(400, dtype=torch.long))
    ranges = sorted((float(y[s].min()), float(y[s].max())) for s in shards)
    # one contiguous run of sorted targets each: the ranges do not overlap
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize(("parts", "d"), [(4, 1), (4, 2), (5, 3), (6, 6)])
def test_redundant_each_partition_held_by_d_workers(digits: Workload, parts: int, d: int) -> None:
    alloc = cyclic_allocation(parts, d)
    assert alloc[0] == list(range(d))
    held = torch.bincount(torch.tensor([p for ids in alloc for p in ids]), minlength=parts)
    assert torch.equal(held, torch.full((parts,), d))
    assert all(len(set(ids)) == d for ids in alloc)
    y = digits.train.y
    shards = partition(y, parts, "redundant", redundancy=d, seed=2)
    assert torch.equal(_as_counts(shards, len(y)), torch.full((len(y),), d))
    pieces = partition_indices(y, parts, seed=2)
    for w, ids in enumerate(alloc):
        assert torch.equal(shards[w], torch.cat([pieces[p] for p in ids]))


def test_redundancy_one_is_iid(digits: Workload) -> None:
    a = partition(digits.train.y, 4, "redundant", redundancy=1, seed=5)
    b = partition(digits.train.y, 4, "iid", seed=5)
    assert all(torch.equal(x, z) for x, z in zip(a, b, strict=True))


def test_partition_rejects_bad_arguments(digits: Workload) -> None:
    with pytest.raises(ConfigError, match="iid"):
        partition(digits.train.y, 4, "dirichlet")
    with pytest.raises(ConfigError, match="redundancy"):
        partition(digits.train.y, 4, "redundant", redundancy=5)
    with pytest.raises(ConfigError, match="workers"):
        partition(torch.arange(3), 4)


# ---- ShardLoader -----------------------------------------------------------------------------

def _take(loader: ShardLoader, k: int) -> list[torch.Tensor]:
    return [loader.next_batch()[1].clone() for _ in range(k)]


def _loader_data() -> ArrayDataset:
    return ArrayDataset(torch.arange(100).float().unsqueeze(1), torch.arange(100))


def test_shard_loader_reproducible_and_reshuffles() -> None:
    data, idx = _loader_data(), torch.arange(10, 60)
    a, b = ShardLoader(data, idx, 8, seed=7), ShardLoader(data, idx, 8, seed=7)
    assert a.steps_per_epoch == 6
    seq_a, seq_b = _take(a, 20), _take(b, 20)
    assert all(torch.equal(x, z) for x, z in zip(seq_a, seq_b, strict=True))
    other = _take(ShardLoader(data, idx, 8, seed=8), 20)
    assert not all(torch.equal(x, z) for x, z in zip(seq_a, other, strict=True))
    epoch0, epoch1 = torch.cat(seq_a[:6]), torch.cat(seq_a[6:12])
    assert len(set(epoch0.tolist())) == 48 and set(epoch0.tolist()) <= set(range(10, 60))
    assert not torch.equal(epoch0, epoch1)  # reshuffled
    assert a.epoch == 3 and a.position == 16  # 20 batches = 3 epochs of 6 + 2


def test_shard_loader_keep_last_covers_shard() -> None:
    loader = ShardLoader(_loader_data(), torch.arange(50), 8, seed=0, drop_last=False)
    assert loader.steps_per_epoch == 7
    batch = _take(loader, 7)
    assert len(batch[-1]) == 2
    assert sorted(torch.cat(batch).tolist()) == list(range(50))
    assert loader.epoch == 1 and loader.position == 0


def test_shard_loader_resume_continues_identically() -> None:
    data, idx = _loader_data(), torch.arange(0, 100, 3)
    ref = ShardLoader(data, idx, 5, seed=11)
    _take(ref, 9)  # crosses an epoch boundary (6 steps per epoch)
    state = ref.state_dict()
    expected = _take(ref, 15)
    resumed = ShardLoader(data, idx, 5, seed=11)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (state["epoch"], state["position"])
    got = _take(resumed, 15)
    assert all(torch.equal(x, z) for x, z in zip(expected, got, strict=True))
    with pytest.raises(CheckpointError, match="seed"):
        ShardLoader(data, idx, 5, seed=12).load_state_dict(state)


def test_shard_loader_rejects_shard_smaller_than_batch() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        ShardLoader(_loader_data(), torch.arange(4), 8, seed=0)


# ---- datasets and models ---------------------------------------------------------------------

def test_registry_and_determinism(digits: Workload) -> None:
    assert set(WORKLOADS) == {"digits", "mnist5k", "fashion", "regression", "resnet18", "textlm"}
    assert digits.train.x.shape[1:] == (64,) and 0.0 <= float(digits.train.x.min())
    assert float(digits.train.x.max()) <= 1.0
    assert len(digits.train) + len(digits.test) == 1797
    assert abs(len(digits.test) / 1797 - 0.2) < 0.01
    again = build_workload(WorkloadConfig(name="digits"), seed=0)
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.test.y, digits.test.y)
    other = build_workload(WorkloadConfig(name="digits"), seed=1)
    assert not torch.equal(other.train.y, digits.train.y)
    torch.manual_seed(0)
    m1 = digits.model_fn()
    torch.manual_seed(0)
    m2 = digits.model_fn()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


def test_digits_mlp_learns_quickly(digits: Workload) -> None:
    torch.manual_seed(0)
    model = digits.model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = ShardLoader(digits.train, torch.arange(len(digits.train)), 32, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time, one thread: stable even when the machine is busy
    try:
        t0 = time.process_time()
        for _ in range(5 * loader.steps_per_epoch):  # 5 epochs, ~225 steps
            x, y = loader.next_batch()
            opt.zero_grad()
            digits.loss_fn(model(x), y).backward()
            opt.step()
        elapsed = time.process_time() - t0
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = float((model(digits.test.x).argmax(1) == digits.test.y).float().mean())
    assert acc > 0.9, acc
    assert elapsed < 5.0, elapsed


def test_unknown_option_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match="hidden") as info:
        build_workload(WorkloadConfig(name="digits", options={"hiden": 64}))
    assert "hiden" in str(info.value)
    with pytest.raises(ConfigError, match="n_train"):
        build_workload(WorkloadConfig(name="resnet18", options={"n": 5}))
    with pytest.raises(ConfigError, match="dim"):
        build_workload(WorkloadConfig(name="regression", options={"n": 5, "dim": 10}))


def test_digits_fast_reader_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    from tandem.workloads.digits import load_arrays

    x, y = load_arrays()
    ref = load_digits()
    assert np.array_equal(x, ref.data) and np.array_equal(y, ref.target)


def test_digits_hidden_option() -> None:
    work = build_workload(WorkloadConfig(name="digits", options={"hidden": 32}))
    assert count_parameters(work.model_fn()) == 64 * 32 + 32 + 32 * 10 + 10


def test_small_cnn_hidden_option() -> None:
    """The CNN's first linear layer follows ``hidden`` (the fashion and mnist5k option)."""
    conv = 1 * 16 * 25 + 16 + 16 * 32 * 25 + 32
    assert count_parameters(SmallCNN()) == conv + 512 * 64 + 64 + 64 * 10 + 10 == 46_730
    assert count_parameters(SmallCNN(hidden=512)) == conv + 512 * 512 + 512 + 512 * 10 + 10
    work = build_workload(WorkloadConfig(name="mnist5k", options={"hidden": 8}), seed=0)
    model = work.model_fn()
    assert count_parameters(model) == conv + 512 * 8 + 8 + 8 * 10 + 10
    assert model(work.test.x[:3]).shape == (3, 10)


def test_regression_optimum_has_zero_gradient() -> None:
    work = build_workload(WorkloadConfig(name="regression", options={"dim": 8, "n": 500}), seed=3)
    assert work.task == "regression" and work.num_classes is None
    assert work.train.x.shape == (500, 8) and work.train.y.shape == (500, 1)
    model = work.model_fn()
    assert work.optimum is not None and work.optimum.shape == (8,)
    with torch.no_grad():
        model.weight.copy_(work.optimum.view(1, -1))
    loss = work.loss_fn(model(work.train.x), work.train.y)
    loss.backward()
    assert float(model.weight.grad.abs().max()) < 1e-4
    with torch.no_grad():  # and it is not trivially zero elsewhere
        model.weight.copy_(work.meta["w_true"].view(1, -1))
    model.zero_grad()
    work.loss_fn(model(work.train.x), work.train.y).backward()
    assert float(model.weight.grad.abs().max()) > 1e-4


def test_resnet18_parameter_count() -> None:
    model = ResNet18()
    assert 11_000_000 <= count_parameters(model) <= 11_400_000
    work = build_workload(WorkloadConfig(name="resnet18", options={"n_train": 16, "n_test": 4}))
    assert work.train.x.shape == (16, 3, 32, 32) and len(work.test) == 4
    model.eval()
    with torch.no_grad():
        assert model(work.test.x).shape == (4, 10)


def test_mnist5k_loads_5000_samples() -> None:
    work = build_workload(WorkloadConfig(name="mnist5k"), seed=0)
    assert len(work.train) + len(work.test) == 5000
    assert len(work.test) == 1000
    assert work.train.x.shape[1:] == (1, 28, 28) and float(work.train.x.max()) <= 1.0
    assert torch.equal(torch.bincount(work.test.y), torch.full((10,), 100))
    assert count_parameters(work.model_fn()) < 500_000
    assert work.model_fn()(work.test.x[:3]).shape == (3, 10)


def test_array_dataset_from_dataset() -> None:
    items = [(np.full((2, 2), i, dtype=np.float32), i % 3) for i in range(7)]
    ds = ArrayDataset.from_dataset(items)  # a list is a map-style dataset
    assert ds.x.shape == (7, 2, 2) and ds.y.dtype == torch.long and len(ds) == 7
    sub = ds.subset([6, 1])
    assert sub.y.tolist() == [0, 1] and float(sub.x[0, 0, 0]) == 6.0
    work = Workload.custom(model_fn=SmallCNN, train=items, test=items)
    assert work.task == "classification" and work.num_classes == 3
    with pytest.raises(DataError):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(4))


# ---- fashion / IDX ---------------------------------------------------------------------------

def _write_fake_fashion(folder: Path, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)


def test_fashion_missing_path_raises_helpful_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_workload(WorkloadConfig(name="fashion", data_path=tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "make bench-data" in msg
    assert "data_path" in msg


def test_fashion_reads_idx_files(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path)
    work = build_workload(WorkloadConfig(name="fashion", data_path=tmp_path,
                                         options={"n_train": 12, "hidden": 8}), seed=0)
    assert len(work.train) == 12 and len(work.test) == 10
    assert work.model_fn().classifier[1].out_features == 8
    assert work.train.x.shape[1:] == (1, 28, 28) and work.train.x.dtype == torch.float32
    assert 0.0 <= float(work.train.x.min()) and float(work.train.x.max()) <= 1.0
    assert work.test.y.tolist() == list(range(10))
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "plain-idx3-ubyte", arr)  # uncompressed works too
    assert np.array_equal(read_idx(tmp_path / "plain-idx3-ubyte", ndim=3), arr)


@pytest.mark.parametrize("damage", ["magic", "truncated", "not_gzip", "rank"])
def test_malformed_idx_raises_data_error(tmp_path: Path, damage: str) -> None:
    _write_fake_fashion(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    if damage == "magic":
        target.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
    elif damage == "truncated":
        target.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "not_gzip":
        target.write_bytes(b"this is not a gzip stream")
    else:
        write_idx(target, np.zeros((20, 784), dtype=np.uint8))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_workload(WorkloadConfig(name="fashion", data_path=tmp_path))


def test_fashion_label_count_mismatch(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, dtype=np.uint8))
    with pytest.raises(DataError, match="labels"):
        build_workload(WorkloadConfig(name="fashion", data_path=tmp_path))


@pytest.mark.skipif(not fashion_mod.debian_dirs(), reason="dataset-fashion-mnist not installed")
def test_fashion_from_debian_package() -> None:
    work = build_workload(WorkloadConfig(name="fashion", options={"n_test": 500}), seed=0)
    assert len(work.train) == 60_000 and len(work.test) == 500
    assert torch.equal(torch.bincount(work.train.y), torch.full((10,), 6000))
    assert math.isclose(float(work.train.x.mean()), 0.286, abs_tol=0.01)
