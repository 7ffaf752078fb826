"""``fashion``: Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) with the small CNN.

Read from the four standard IDX files (``train-images-idx3-ubyte.gz`` ...; uncompressed names work
too). Where they are looked for, in order:

1. ``workload.data_path`` (the folder itself or its ``fashion-mnist/`` subfolder), when given;
   then nowhere else, so a wrong path is reported rather than silently replaced;
2. the folders of Debian's ``dataset-fashion-mnist`` package (``dpkg -L dataset-fashion-mnist``);
3. ``/usr/share/datasets/fashion-mnist`` (that package's usual place).

Nothing is ever downloaded. Get the files with ``make bench-data`` or
``apt-get install dataset-fashion-mnist``, or point ``data_path`` at a copy.

Options: ``n_train`` / ``n_test`` (seeded random subsets, default all; with ``n_train=6000`` an
epoch is 10x shorter: measured 77% test accuracy after 3 epochs, batch 64, lr 0.1, momentum 0.9,
~2 s per epoch on 2 cores), ``width`` (CNN channel multiplier, default 1), ``hidden`` (width of
its first linear layer, default 64; 512 gives ~281k parameters at about the same compute).
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from tandem.config import WorkloadConfig
from tandem.errors import DataError
from tandem.workloads.base import ArrayDataset, Options, Workload, parse_options, register_workload
from tandem.workloads.idx import read_idx
from tandem.workloads.models import SmallCNN

FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (f"get it with `make bench-data` or `apt-get install {DEBIAN_PACKAGE}`, or pass "
              "--data-path (workload.data_path) pointing at a folder holding "
              f"{', '.join(n + '.gz' for n in FILES.values())}")


class FashionOptions(Options):
    n_train: int | None = Field(default=None, ge=1, description="seeded random subset of the "
                                "60000 training images; None = all (6000: 10x shorter epochs)")
    n_test: int | None = Field(default=None, ge=1, description="seeded random subset of the "
                               "10000 test images; None = all")
    width: int = Field(default=1, ge=1, description="CNN channel multiplier")
    hidden: int = Field(default=64, ge=1, description="width of the CNN's first linear layer "
                        "(512: ~281k parameters at about the same compute)")


def debian_dirs() -> list[Path]:
    """Folders that ``dpkg -L dataset-fashion-mnist`` lists files of; empty without the package."""
    try:
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    dirs = {Path(line).parent for line in out.splitlines() if "idx" in Path(line).name}
    return sorted(dirs)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def find_files(data_path: Path | None = None) -> dict[str, Path]:
    """The four IDX files, from the first place that holds all of them; DataError if none does."""
    if data_path is not None:
        base = Path(data_path).expanduser()
        places = [base, base / "fashion-mnist"]
    else:
        places = debian_dirs() + [DEBIAN_DIR]
    for folder in dict.fromkeys(places):  # ordered, without duplicates
        found = {key: _find(folder, name) for key, name in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    looked = ", ".join(str(p) for p in dict.fromkeys(places))
    raise DataError(f"Fashion-MNIST not found (looked in: {looked}); {HOW_TO_GET}")


def _load(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_idx(images, ndim=3), read_idx(labels, ndim=1)
    if x.shape[1:] != (28, 28):
        raise DataError(f"{images}: images are {x.shape[1:]}, expected 28x28")
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(y) and int(y.max()) > 9:
        raise DataError(f"{labels}: label {int(y.max())} is out of range 0..9")
    xt = torch.from_numpy(x.copy()).to(torch.float32).div_(255.0).unsqueeze(1)
    return xt, torch.from_numpy(y.astype("int64"))


def _subset(ds: ArrayDataset, n: int | None, seed: int) -> ArrayDataset:
    if n is None or n >= len(ds):
        return ds
    gen = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=gen)[:n].sort().values)


@register_workload("fashion", options=FashionOptions)
def build(cfg: WorkloadConfig, seed: int = 0) -> Workload:
    opts = parse_options(FashionOptions, cfg.options, "fashion")
    files = find_files(cfg.data_path)
    train = _subset(ArrayDataset(*_load(files["train_x"], files["train_y"])), opts.n_train, seed)
    test = _subset(ArrayDataset(*_load(files["test_x"], files["test_y"])), opts.n_test, seed + 1)
    return Workload(
        name="fashion", model_fn=partial(SmallCNN, 10, opts.width, hidden=opts.hidden),
        train=train, test=test, loss_fn=F.cross_entropy, task="classification", num_classes=10,
        meta={"input_shape": (1, 28, 28), "source": str(files["train_x"].parent),
              "options": opts.model_dump()},
    )
