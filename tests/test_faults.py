"""Injected stragglers and slow workers: reproducible from the seed, and the right sizes."""

from __future__ import annotations

import numpy as np

from tandem.config import load_config
from tandem.trainer.stragglers import ComputeFaults, straggler_mask


def test_straggler_draws_reproduce_from_seed_and_differ_across_seeds():
    cfg = load_config(workers=4, stragglers="0.3:5", seed=11)
    a = [ComputeFaults.from_config(cfg, 2).straggles(s) for s in range(400)]
    b = [ComputeFaults.from_config(cfg, 2).straggles(s) for s in range(400)]
    c = [ComputeFaults.from_config(load_config(workers=4, stragglers="0.3:5", seed=12), 2)
         .straggles(s) for s in range(400)]
    assert a == b and a != c
    assert 0.22 < np.mean(a) < 0.38  # p = 0.3 over 400 draws
    # the vectorised form used by simulators gives the very same draws
    mask = np.stack([straggler_mask(11, 4, s, cfg.stragglers) for s in range(400)])
    assert list(mask[:, 2]) == a


def test_delay_sizes_factor_exponential_and_slow_worker():
    cfg = load_config(workers=4, stragglers="1.0:5", slow_workers=["1:3"])
    extra, straggled = ComputeFaults.from_config(cfg, 0).delay(0, 0.1)
    assert straggled and abs(extra - 0.5) < 1e-12          # 5 x compute
    extra, _ = ComputeFaults.from_config(cfg, 1).delay(0, 0.1)
    assert abs(extra - (0.2 + 0.5)) < 1e-12                # slow 3x adds 2 x compute, plus straggle
    exp = load_config(workers=2, stragglers="1.0:exp:0.05")
    draws = [ComputeFaults.from_config(exp, 0).delay(s, 0.0)[0] for s in range(2000)]
    assert abs(np.mean(draws) - 0.05) < 0.01
    none = ComputeFaults.from_config(load_config(workers=2), 0)
    assert none.delay(5, 0.1) == (0.0, False)
