"""Worker-side functions for tests/test_pipeline.py (spawned processes import them by name)."""

from __future__ import annotations

from typing import Any


def train_params(cfg_data: dict[str, Any]) -> dict[str, Any]:
    """Run this rank of a job and return its result with parameters as numpy arrays (plain
    pickles: the comparison needs the exact bits, not a shared-memory handle)."""
    from tandem.worker import main

    result = main(cfg_data, None, True)
    result["params"] = [p.numpy().copy() for p in result.get("params", [])]
    return result
