"""Gradient coding: allocations, the unbiased SGC estimator, exact classic-GC decoding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tandem.coding import (
    gradient_code,
    make_allocation,
    sgc_encode,
    sgc_estimate,
    sgc_weight,
)
from tandem.errors import ConfigError


@pytest.mark.parametrize("scheme,n,d", [("cyclic", 7, 3), ("cyclic", 5, 1), ("cyclic", 4, 4),
                                        ("fractional", 6, 2), ("fractional", 8, 4)])
def test_every_partition_is_held_by_exactly_d_workers(scheme, n, d):
    a = make_allocation(n, d, scheme)
    assert all(len(h) == d == len(set(h)) for h in a.held)
    assert all(len(a.holders(k)) == d for k in range(n))
    assert (a.matrix().sum(0) == d).all()


def test_fractional_needs_d_to_divide_n():
    with pytest.raises(ConfigError, match="divide"):
        make_allocation(7, 2, "fractional")


def _all_patterns(n, p):
    for bits in itertools.product([False, True], repeat=n):
        yield bits, p ** sum(bits) * (1 - p) ** (n - sum(bits))


@pytest.mark.parametrize("scheme,n,d,p", [("cyclic", 6, 2, 0.3), ("cyclic", 5, 3, 0.5),
                                          ("fractional", 6, 3, 0.2), ("cyclic", 4, 1, 0.4)])
def test_sgc_estimator_is_exactly_unbiased(scheme, n, d, p):
    """The expectation over all 2^n straggler patterns equals the full gradient sum."""
    g = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    a = make_allocation(n, d, scheme)
    mean = sum(w * sgc_estimate(g, a, p, bits) for bits, w in _all_patterns(n, p))
    torch.testing.assert_close(mean, g.sum(0), rtol=0, atol=1e-12)
    # without the 1/(1-p) factor (the `redundant` baseline) it is biased low by (1 - p)
    biased = sum(w * sgc_estimate(g, a, 0.0, bits) for bits, w in _all_patterns(n, p))
    torch.testing.assert_close(biased, (1 - p) * g.sum(0), rtol=0, atol=1e-12)


def test_sgc_monte_carlo_unbiased_and_variance_falls_with_d():
    n, p, trials = 8, 0.3, 50000
    g = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    variances = []
    for d in (1, 2, 3):
        a = make_allocation(n, d)
        masks = rng.random((trials, n)) < p
        # vectorised sum of the survivors' messages; sgc_estimate checked on the first few
        alive = torch.from_numpy((~masks).astype(np.float64)) * sgc_weight(d, p)
        draws = alive @ torch.from_numpy(a.matrix()) @ g
        for t in range(5):
            torch.testing.assert_close(draws[t], sgc_estimate(g, a, p, masks[t]))
        se = draws.std(0) / trials ** 0.5
        assert ((draws.mean(0) - g.sum(0)).abs() < 4 * se + 1e-9).all()
        variances.append(float(draws.var(0).sum()))
    assert variances[0] > variances[1] > variances[2]


def test_sgc_encode_weights_and_zeroes_stragglers():
    gs = [torch.ones(3), 2 * torch.ones(3)]
    torch.testing.assert_close(sgc_encode(gs, 2, 0.5), torch.full((3,), 3.0 / (2 * 0.5)))
    assert sgc_encode(gs, 2, 0.5, straggled=True).abs().sum() == 0
    assert sgc_weight(3, 0.0) == pytest.approx(1 / 3)
    with pytest.raises(ConfigError):
        sgc_weight(2, 1.0)


@pytest.mark.parametrize("scheme,n,s", [("cyclic", 5, 1), ("cyclic", 6, 2), ("cyclic", 8, 3),
                                        ("cyclic", 7, 0), ("cyclic", 9, 4),
                                        ("fractional", 6, 1), ("fractional", 6, 2),
                                        ("fractional", 8, 3)])
def test_gradient_code_decodes_exactly_from_every_survivor_set(scheme, n, s):
    code = gradient_code(n, s, scheme, seed=3)
    B = code.B
    support = code.alloc.matrix()
    assert (B[support == 0] == 0).all()  # each worker only uses the partitions it holds
    g = torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
    coded = {i: code.encode(i, [g[k] for k in code.alloc.held[i]]) for i in range(n)}
    for survivors in itertools.combinations(range(n), n - s):
        a = code.decoder(survivors)
        assert set(np.flatnonzero(a)) <= set(survivors)
        np.testing.assert_allclose(a @ B, np.ones(n), atol=1e-9)
        out = code.decode({i: coded[i] for i in survivors})
        torch.testing.assert_close(out, g.sum(0), rtol=1e-9, atol=1e-9)
    assert code.max_decode_error() < 1e-9
    if s > 0:
        with pytest.raises(ConfigError, match="tolerates"):
            code.decoder(range(n - s - 1))
