"""Every strategy x codec pair (issue 20): the resolve step accepts exactly the pairs that run
the codec as documented and refuses the others before start, naming why; for every accepted
pair a short real run shows that the codec's own path is what ran (a spy in each process logs
the codec methods called: an all-reduce runs the codec's ``exchange``, a parameter server its
``encode`` on the workers and ``decode`` on the server, gossip ``encode`` and ``add_decoded``
on every peer, LGC on a parameter server LGC-PS's own
halves and never the message-level top-k, and strategies that use no codec call none)."""

from __future__ import annotations

from pathlib import Path

import pytest

import ps_jobs
import tandem
from tandem.codecs.base import CODECS
from tandem.errors import ConfigError
from tandem.strategies.base import STRATEGIES

CODEC_OPTS = {"topk": {"ratio": 0.1}, "randomk": {"ratio": 0.1}, "powersgd": {"rank": 1},
              "lgc": {"variant": "ps", "ratio": 0.1, "dense_first_last": False}}
STRATEGY = {  # name -> (options, workers)
    "allreduce": ({}, 2), "local": ({}, 1), "coded_ps": ({"s": 0}, 2),
    # bsp_shared counts its supersteps, so LGC knows how many exchanges it will make
    "gossip": ({"topology": "ring"}, 3), "bsp_shared": ({"machines": 2, "grads_per_superstep": 2},
                                                       2),
    "pipeline": ({"models": [{"lr": 0.1}]}, 2), "param_server": ({"mode": "sync"}, 2),
}
#: why a pair is refused, as the resolve step words it (a fragment of its message)
REFUSED = {
    **{(s, c): "uses no codec" for s in ("local", "coded_ps") for c in CODECS.names()
       if c != "dense"},
    ("gossip", "powersgd"): "decode it alone", ("gossip", "lgc"): "decode it alone",
    ("param_server", "powersgd"): "collective among the workers",
}


def _cfg(strategy: str, codec: str, out: Path | None = None) -> dict:
    opts, workers = STRATEGY[strategy]
    cfg = {"workload": {"name": "digits", "options": {"hidden": 8}}, "workers": workers,
           "steps": 3, "batch_size": 8, "lr": 0.1, "seed": 1, "progress": False,
           "timeout_s": 60, "eval_every": 100,
           "strategy": {"name": strategy, "options": dict(opts)},
           "codec": {"name": codec, "options": dict(CODEC_OPTS.get(codec, {}))}}
    if out is not None:
        cfg["out"] = str(out)
    return cfg


PAIRS = [(s, c) for s in sorted(STRATEGY) for c in sorted(CODECS.names())]
ACCEPTED = [pair for pair in PAIRS if pair not in REFUSED]


def test_every_strategy_and_codec_is_walked():
    assert sorted(STRATEGY) == sorted(STRATEGIES.names())
    assert len(PAIRS) == len(STRATEGIES.names()) * len(CODECS.names())


@pytest.mark.parametrize(("strategy", "codec"), PAIRS)
def test_the_resolve_step_accepts_exactly_the_pairs_that_run_as_documented(strategy, codec):
    cfg = _cfg(strategy, codec)
    if (strategy, codec) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[strategy, codec]) as info:
            tandem.load_config(cfg)
        assert repr(codec) in str(info.value) and "codec" in str(info.value)
    else:
        tandem.load_config(cfg)


def test_lgc_rar_on_a_parameter_server_is_refused_with_the_fix():
    cfg = _cfg("param_server", "lgc")
    cfg["codec"]["options"]["variant"] = "rar"
    with pytest.raises(ConfigError, match="variant=ps"):
        tandem.load_config(cfg)


def _expected(strategy: str, codec: str, workers: int) -> tuple[dict[int, set[str]], set[str]]:
    """Per rank, the calls that must appear; and calls that must not appear anywhere."""
    never = {"lgc.encode"} if codec == "lgc" else set()  # LGC's message-level top-k
    if strategy in ("local", "coded_ps") or (strategy == "gossip" and codec == "dense"):
        return {r: set() for r in range(workers)}, {f"{codec}.{m}" for m in
                                                     ("encode", "decode", "add_decoded",
                                                      "exchange")}
    if strategy == "gossip":  # CHOCO adds each decoded code into a public copy
        return {r: {f"{codec}.encode", f"{codec}.add_decoded"} for r in range(workers)}, never
    if strategy == "param_server":
        if codec == "lgc":
            return {0: {"lgc.ps_push"}, 1: {"lgc.ps_push"}, 2: {"lgc.ps_decode"}}, never
        return {0: {f"{codec}.encode"}, 1: {f"{codec}.encode"}, 2: {f"{codec}.decode"}}, never
    if strategy == "bsp_shared":  # the agents (ranks workers..) exchange across machines
        return {workers + m: {f"{codec}.exchange"} for m in range(2)}, never
    return {r: {f"{codec}.exchange"} for r in range(workers)}, never


@pytest.mark.parametrize(("strategy", "codec"), ACCEPTED)
def test_an_accepted_pair_runs_the_codecs_own_path(strategy, codec, tmp_path):
    log = tmp_path / "calls"
    log.mkdir()
    out = tandem.train(_cfg(strategy, codec, tmp_path / "run"),
                       workload=ps_jobs.spy_workload(str(log)), timeout_s=180)
    assert out["steps"] >= 1
    calls = {int(p.name.split(".")[1]): set(p.read_text().split())
             for p in log.glob("calls.*.txt")}
    must, never = _expected(strategy, codec, STRATEGY[strategy][1])
    for rank, wanted in must.items():
        assert wanted <= calls.get(rank, set()), (rank, calls)
    assert not never & set().union(*calls.values(), set()), calls
