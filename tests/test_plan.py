"""``tandem plan``: the cost formulas agree with the transport's accounting, the predicted bytes
with what a real run meters, and the predictions move the right way (more bandwidth is never
slower, a deadline never slower than waiting for everyone, a parameter server's link is the
bottleneck in proportion to N / servers). The CLI prints one row per strategy x codec and
refuses bad flags with one line. Behaviour only: no assertion on how fast anything ran."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from typer.testing import CliRunner

import tandem
from tandem.cli import app
from tandem.plan import ComputeTime, Network, PlanOptions, Tier, plan, predict, predict_one
from tandem.plan.measure import profile, pull_bytes, push_bytes
from tandem.plan.model import METHODS, accepted_codecs
from tandem.plan.network import ring_all_reduce_bytes
from tandem.transport import costs


@pytest.fixture(scope="module")
def prof():
    """digits' exact messages; the codecs' CPU time (measured on a loaded machine) zeroed,
    so every prediction here is a pure function of the model."""
    p = profile("digits", reps=1, warmup=1)
    for c in p.codecs.values():
        c.encode_s = c.decode_s = c.exchange_s = 0.0
    return p


def test_ring_all_reduce_matches_the_transport_byte_accounting():
    for nbytes in (4, 1000, 186_920, 44_695_848):
        for n in (1, 2, 3, 8, 64, 1024):
            metered = costs.all_reduce(nbytes, n)
            assert ring_all_reduce_bytes(nbytes, n) == metered.sent == metered.recv
            net = Network(Tier(12.5e6, 1e-3), backend="tandem")
            cost = net.all_reduce(nbytes, n)
            assert cost.sent == metered.sent
            # the emulator's time for the same operation (costs.Traffic.seconds)
            assert cost.seconds == pytest.approx(metered.seconds(12.5e6, 1e-3))
            assert net.all_gather(nbytes, n).sent == costs.all_gather(nbytes, n).sent


def test_predicted_bytes_equal_what_a_two_worker_run_meters(tmp_path, prof):
    summary = tandem.train({"workload": {"name": "digits"}, "strategy": "allreduce",
                            "codec": "dense", "workers": 2, "steps": 3, "progress": False,
                            "eval_every": 100, "out": str(tmp_path / "run")})
    pred = predict_one(prof, Network(Tier(1.25e8, 5e-5)), ComputeTime(0.01), "allreduce",
                       "dense", 2)
    assert pred.bytes_per_step == summary["bytes_sent_per_worker_per_step"]
    assert pred.bytes_per_step == costs.all_reduce(4 * prof.params, 2).sent


def test_parameter_server_link_is_the_bottleneck_in_proportion_to_n_over_servers(prof):
    """With the workers' own links fast and the servers' the same speed, the round grows by
    (N/S) x (a push + a pull), one after the other (a server's pulls share its link): doubling
    N doubles it, doubling S halves it."""
    net = Network(Tier(1e7, 0.0), adds_per_s=1e30)
    ct = ComputeTime(1e-3)

    def comm(n: int, servers: int) -> float:
        p = predict_one(prof, net, ct, "param_server:sync", "dense", n,
                        PlanOptions(servers=servers))
        return p.step_s - p.compute_s

    q, p = max(pull_bytes(prof, 1)), max(push_bytes(prof, "dense", 1))
    step = 32 * (p + q) / 1e7
    assert comm(64, 1) - comm(32, 1) == pytest.approx(step, rel=0.02)
    assert comm(128, 2) == pytest.approx(comm(64, 1), rel=0.03)
    assert comm(256, 4) == pytest.approx(comm(64, 1), rel=0.05)
    assert sum(push_bytes(prof, "dense", 2)) > sum(push_bytes(prof, "dense", 1))  # 2 headers


def test_coded_ps_round_carries_only_the_answers_it_waits_for(prof):
    """coded_ps decodes from its first n - s answers and sends those workers the new parameters
    at once; the late ones get theirs when their stale answers come in, behind the round. So
    its server's link carries (n - s) x (a push + a pull) a round: one more tolerated
    straggler takes one of each off. Breaks if the round charges a pull to every worker (what
    over-predicted bench/plan's coded_ps by 27-31 % at N = 2)."""
    net = Network(Tier(1e7, 0.0), adds_per_s=1e30)
    ct = ComputeTime(1e-3)
    msg = 4 * (prof.params + 1) / 1e7  # parameters / a coded gradient, with the step tag

    def comm(n: int, s: int) -> float:
        return predict_one(prof, net, ct, "coded_ps", "dense", n, PlanOptions(coded_s=s)).comm_s

    assert comm(8, 1) - comm(8, 2) == pytest.approx(2 * msg, rel=0.02)
    assert comm(8, 1) - comm(4, 1) == pytest.approx(4 * 2 * msg, rel=0.02)


def test_more_bandwidth_is_never_slower_and_a_deadline_never_slower_than_waiting(prof):
    ct = ComputeTime.of(0.02, "0.1:4", jitter_s=0.002)
    for net in (Network.parse("100mbit:1ms"), Network.parse("1gbit:50us", backend="gloo"),
                Network.parse(None, "10gbit:20us", 8)):
        slow = predict(prof, net, ct, [2, 16, 128])
        fast = predict(prof, net.with_bandwidth(4.0), ct, [2, 16, 128])
        for a, b in zip(slow, fast, strict=True):
            assert (a.method, a.codec, a.workers) == (b.method, b.codec, b.workers)
            # a faster link brings the candidate's pulls sooner, so it pushes more often: each
            # push costs its CPU a little encoding and merging (and freshens its model)
            slack = 1e-3 if a.method == "param_server:candidate" else 1e-9
            assert b.step_s <= a.step_s * (1 + slack), (a.method, a.codec, a.workers)
        by = {(p.method, p.codec, p.workers): p for p in slow}
        for (method, codec, n), p in by.items():
            if method == "gossip:goco":
                assert p.step_s <= by[("gossip:wait", codec, n)].step_s
                for opts in (PlanOptions(deadline_s=0.03), PlanOptions(deadline_s=1.0),
                             PlanOptions(deadline_factor=1.0), PlanOptions(deadline_factor=9.0)):
                    capped = predict_one(prof, net, ct, method, codec, n, opts)
                    assert capped.step_s <= by[("gossip:wait", codec, n)].step_s + 1e-12


def test_waiting_for_the_slowest_grows_with_n_and_stragglers():
    ct = ComputeTime.of(0.1, "0.05:5")
    maxima = [ct.expected_max(n) for n in (1, 2, 8, 64, 1024)]
    assert maxima == sorted(maxima) and maxima[0] == pytest.approx(ct.mean())
    assert maxima[-1] == pytest.approx(0.1 * (1 + 5 * (1 - 0.95**1024)), rel=1e-3)
    assert ct.capped(0.0).expected_max(1024) == pytest.approx(0.1, rel=1e-3)
    assert ct.deadline(factor=1.0).expected_max(1024) == pytest.approx(0.1, rel=1e-3)
    assert ct.deadline(factor=1.5).expected_max(1024) == pytest.approx(0.15, rel=1e-3)
    assert ct.deadline(seconds=0.12).expected_max(1024) == pytest.approx(0.12, rel=1e-2)
    assert replace(ct, p=0.0).expected_max(64) == pytest.approx(0.1)


def _rows(output: str) -> list[tuple[str, str]]:
    rows = []
    for line in output.splitlines():
        m = re.match(r"^(\d+|floor)\s+(\S+)\s+(\S+)\s", line)
        if m:
            rows.append((m.group(2), m.group(3)))
    return rows


def test_cli_prints_one_row_per_strategy_and_codec(tmp_path):
    codecs = ["dense", "topk", "powersgd"]  # all, a self-contained code, a collective one
    res = CliRunner().invoke(app, ["plan", "--workload", "digits", "--workers", "2,8",
                                   "--compute-s", "0.01", "--codecs", ",".join(codecs),
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    want = {(m.replace("pipeline", "pipeline(K=2)"), c) for m, (s, _) in METHODS.items()
            for c in accepted_codecs(s, codecs)}
    assert ("gossip:goco", "powersgd") not in want and ("coded_ps", "topk") not in want
    assert len(rows) == len(want) and set(rows) == want
    assert "I would pick" in res.output
    assert (tmp_path / "plan.png").stat().st_size > 0 and (tmp_path / "plan.json").exists()


def test_the_plan_predicts_what_tandem_train_runs_and_nothing_it_refuses():
    """Every strategy x codec the planner predicts passes ``tandem train``'s checks, and every
    one it leaves out is refused there (LGC-PS aside: ``variant=ps`` runs on a parameter server
    by a path of its own, which the plan does not model). Breaks if the plan ranks a
    combination that cannot run: it used to predict the parameter server with PowerSGD and with
    LGC, both refused before any worker starts."""
    from tandem.codecs.base import CODECS
    from tandem.config import load_config
    from tandem.errors import ConfigError
    from tandem.resolve import resolve

    names = sorted(CODECS.names())
    for label, (strategy, _) in METHODS.items():
        if strategy in ("coded_ps", "local"):  # exact: dense only (their own tests)
            continue
        opts = {"mode": label.split(":")[1]} if ":" in label else {}
        if strategy == "pipeline":
            opts = {"models": [{}, {}]}
        accepted = set(accepted_codecs(strategy, names))
        for codec in names:
            cfg = load_config({"workload": {"name": "digits"}, "codec": codec, "workers": 4,
                               "strategy": {"name": strategy, "options": opts}})
            if codec in accepted:
                resolve(cfg)
            else:
                with pytest.raises(ConfigError, match="codec"):
                    resolve(cfg)
    assert "powersgd" not in accepted_codecs("param_server", names)
    assert "lgc" not in accepted_codecs("param_server", names)


@pytest.mark.parametrize("args, flag", [
    (["--workers", "2,abc"], "--workers"),
    (["--workers", "0,8"], "--workers"),
    (["--net", "1gbt:50us"], "--net"),
    (["--net", "1gbit:50"], "--net"),
    (["--net-inter", "fast"], "--net-inter"),
    (["--net", "10mbit:1ms,burst=4kb"], "--net"),  # the planner does not model it: refused
    (["--net", "10mbit:1ms,duplex=1.4"], "--net"),
    (["--per-node", "8"], "--per-node"),
    (["--stragglers", "0.1"], "--stragglers"),
    (["--codec-opt", "topk.ratio=2"], "--codec-opt"),
    (["--codecs", "powersgd", "--strategies", "param_server"], "--codecs"),  # none runs
])
def test_cli_refuses_bad_flags_with_one_line(args, flag):
    res = CliRunner().invoke(app, ["plan", "--workload", "digits", *args])
    text = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, text)
    assert "\n" not in text and text.startswith("error: ") and flag in text, text


def test_python_entry_ranks_at_the_largest_n():
    result = plan("digits", [2, 4], compute_s=0.01, codecs=["dense", "topk"],
                  methods=["allreduce", "gossip"])
    assert result.rank_at == 4
    methods = {p.method for p in result.predictions}
    assert methods == {"allreduce", "gossip:goco", "gossip:wait"}
    ranked = result.at(4)
    assert [p.step_s for p in ranked] == sorted(p.step_s for p in ranked)


def test_the_emulator_backend_charges_software_time_only_where_it_outlasts_the_model():
    """The emulator charges a collective from its last rank's join while the loopback run goes
    on meanwhile, its join clock's ring beside it on a group of its own: max(model,
    max(hops, the join clock's 2(N-1)) x overhead). Breaks if the tandem backend adds the model
    and the software time (what it did when the emulator guessed the join from the loopback
    finish), adds the join clock's hops to the collective's (what it did while the clock ran
    first on the same group), forgets them, or if a real engine's backend stops paying the
    overhead on every hop (and no join clock)."""
    link = Tier(bytes_per_s=1e6, latency_s=0.0)  # 4 ranks: a ring all-reduce is 6 hops
    slow = Network(link, backend="tandem", overhead_s=0.001)
    assert slow.all_reduce(400_000, 4).seconds == pytest.approx(0.6)  # 600 kB at 1 MB/s
    busy = Network(link, backend="tandem", overhead_s=0.5)
    assert busy.all_reduce(400_000, 4).seconds == pytest.approx(3.0)  # max(6, 6) hops x 0.5 s
    assert busy.all_gather(10, 4).seconds == pytest.approx(3.0)  # max(3, 6) hops x 0.5 s
    assert busy.broadcast(10, 4).seconds == pytest.approx(3.0)  # max(1, 6) hops x 0.5 s
    assert busy.all_reduce(10, 1).seconds == 0.0  # one rank: no collective at all
    gloo = Network(link, backend="gloo", overhead_s=0.001)
    assert gloo.all_reduce(400_000, 4).seconds == pytest.approx(0.606)
    assert slow.barrier(4).seconds == pytest.approx(0.006)  # max(its 6 hops, the join's 6)


def test_the_emulator_backend_with_nodes_charges_every_process_on_its_hosts_link():
    """The emulator's shared hosts (``hosts=M``) have no intra-node tier: a host's processes
    charge their collectives to its one link in turns, each its flat ring's traffic over all N
    ranks. Breaks if the tandem backend with ``--net-inter``/``--per-node`` uses a real
    engine's hierarchy (the intra-node link carrying most of it), or forgets the sharing."""
    intra, nic = Tier(bytes_per_s=1e9, latency_s=1e-5), Tier(bytes_per_s=1e6, latency_s=1e-3)
    net = Network(intra, nic, per_node=2, backend="tandem")
    # 4 ranks, 2 a host: each process's ring sends 600 kB, two of them on each host's link
    assert net.all_reduce(400_000, 4).seconds == pytest.approx(2 * 0.6 + 6e-3)
    assert net.all_gather(1_000, 4).seconds == pytest.approx(2 * 3e-3 + 3e-3)
    assert net.broadcast(1_000, 4).seconds == pytest.approx(3e-3 + 1e-3)  # the root's 3 copies
    assert net.all_reduce(400_000, 2).seconds == pytest.approx(2 * 0.4 + 2e-3)  # one host
    nccl = Network(intra, nic, per_node=2, backend="nccl")
    assert nccl.all_reduce(400_000, 4).seconds < 0.7  # hierarchical: the NIC carries s/P
