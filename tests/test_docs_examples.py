"""The "one new file" examples in docs/architecture.md work as printed: each block registers its
plugin and the plugin does what it says (so the docs cannot drift from the seams)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return next(b for b in blocks if marker in b)


@pytest.fixture
def registered():
    """Exec a doc block and remove what it registered afterwards (other tests walk the
    registries)."""
    from tandem.codecs.base import CODECS
    from tandem.strategies.base import STRATEGIES
    from tandem.workloads.base import WORKLOADS

    added: list[tuple[object, str]] = []

    def run(marker: str, registry: object, name: str) -> dict:
        ns: dict = {"__name__": f"docs_example_{name}"}
        exec(compile(_block(marker), str(DOC), "exec"), ns)  # noqa: S102 - our own docs
        added.append((registry, name))
        assert name in registry  # type: ignore[operator]
        return ns

    yield run, CODECS, STRATEGIES, WORKLOADS
    for registry, name in added:
        registry._items.pop(name, None)  # type: ignore[attr-defined]


def test_the_codec_example(registered):
    run, codecs, _, _ = registered
    run("codecs/half_sign.py", codecs, "half_sign")
    from tandem.codecs import make_codec

    codec = make_codec("half_sign")
    grads = [torch.tensor([1.0, -3.0]), torch.tensor([[2.0, -2.0]])]
    out = codec.decode(codec.encode(grads))
    assert torch.equal(out[0], torch.tensor([2.0, -2.0]))
    assert torch.equal(out[1], torch.tensor([[2.0, -2.0]]))


def test_the_strategy_example(registered):
    run, _, strategies, _ = registered
    ns = run("strategies/every_other.py", strategies, "every_other")
    from tandem.strategies.allreduce import AllReduceWorker

    assert issubclass(ns["Skipper"], AllReduceWorker)
    assert strategies["every_other"].processes.__func__  # a Strategy with the base's roles


def test_the_workload_example(registered):
    run, _, _, workloads = registered
    run("workloads/moons.py", workloads, "moons")
    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload

    work = build_workload(WorkloadConfig(name="moons", options={"n": 900}), seed=1)
    assert len(work.train) == 800 and len(work.test) == 100
    assert work.model_fn()(work.test.x).shape == (100, 2)
