"""The golden fingerprints recorded before the house-plan refactor still hold: every strategy
(and every codec under allreduce) reaches bitwise the same parameters and sends the same bytes
per step (see tests/golden.py)."""

from __future__ import annotations

import json

import pytest

from golden import CASES, FILE, fingerprint

RECORDED = json.loads(FILE.read_text())


def test_every_case_has_a_recorded_fingerprint():
    assert sorted(RECORDED) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fingerprint_unchanged(name, tmp_path):
    assert fingerprint(name, tmp_path) == RECORDED[name]
