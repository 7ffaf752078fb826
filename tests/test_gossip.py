"""GOCO: the multi-process ``gossip`` strategy, the simulator, and ``coded_ps``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jobs
import tandem
from tandem.config import StragglerConfig, WorkloadConfig
from tandem.errors import TandemError, WorkerFailed
from tandem.launch import spawn
from tandem.sim import SimConfig, floor_table, simulate, study
from tandem.strategies.gossip.evaluate import half_scale
from tandem.topology import make_topology
from tandem.trainer.partitions import data_partitions
from tandem.trainer.stragglers import ComputeFaults, straggler_mask
from tandem.transport import costs
from tandem.workloads import build_workload


def _step_values(run_dir: Path, world: int, key: str) -> np.ndarray:
    """``key`` of each step record, (steps, world)."""
    cols = []
    for r in range(world):
        recs = [json.loads(line) for line in
                (run_dir / f"events.rank{r}.jsonl").read_text().splitlines()]
        cols.append([x[key] for x in recs if x.get("kind") == "step"])
    return np.array(cols).T


def _step_flags(run_dir: Path, world: int, key: str) -> np.ndarray:
    """(steps, world) array of a boolean field of the step records."""
    return _step_values(run_dir, world, key).astype(bool)


def test_simulator_matches_eight_processes_and_goco_converges(tmp_path):
    """Same seeds and straggler draws: the simulator's per-device trajectory equals the run's."""
    steps, seed = 40, 4
    cfg = {"strategy": {"name": "gossip", "options": {"full_batch": True, "topology": "ring"}},
           "workload": {"name": "regression", "redundancy": 2, "options": {"n": 1024}},
           "workers": 8, "steps": steps, "lr": 0.1, "seed": seed, "stragglers": "0.3:2",
           "eval_every": 20, "progress": False, "out": str(tmp_path / "run")}
    summary = tandem.train(cfg, timeout_s=240)
    res = summary["results"]
    traj = np.array([r["trajectory"] for r in res]).T  # (steps, 8)
    sim = simulate(SimConfig(devices=8, d=2, p=0.3, steps=steps, lr=0.1, seed=seed,
                             workload_options={"n": 1024}))
    # identical straggler draws, recorded per peer per step
    flags = _step_flags(tmp_path / "run", 8, "straggled")
    assert (flags == sim.straggled).all() and 0.1 < flags.mean() < 0.5
    want = np.stack([straggler_mask(seed, 8, t, StragglerConfig(p=0.3)) for t in range(steps)])
    assert (flags == want).all()
    # same trajectory up to float32 rounding
    np.testing.assert_allclose(traj, sim.per_device, rtol=2e-3, atol=1e-5)
    # and it converges near the optimum (start ~ 20)
    assert traj[0].mean() > 1.0 and traj[-1].max() < 1e-3
    final = res[0]["evals"][-1]
    assert final["consensus_error"] < 1e-4 and final["opt_error"] < 1e-3
    assert final["opt_error"] == pytest.approx(traj[-1].mean(), rel=1e-3)


def test_overlap_runs_d_psgd_order_exactly_and_converges(tmp_path):
    """overlap=true: each peer mixes x_t in a helper thread while its gradient computes, then
    x_{t+1} = W x_t - lr w e(x_t). The processes' trajectory equals the simulator's in that
    order, and differs from GOCO's order (so the option really changes the algorithm)."""
    steps, seed = 40, 4
    cfg = {"strategy": {"name": "gossip", "options": {"full_batch": True, "topology": "ring",
                                                      "overlap": True}},
           "workload": {"name": "regression", "redundancy": 2, "options": {"n": 1024}},
           "workers": 4, "steps": steps, "lr": 0.1, "seed": seed, "stragglers": "0.3:2",
           "eval_every": 20, "progress": False, "out": str(tmp_path / "run")}
    res = tandem.train(cfg, timeout_s=240)["results"]
    traj = np.array([r["trajectory"] for r in res]).T  # (steps, 4)
    sim = dict(devices=4, d=2, p=0.3, steps=steps, lr=0.1, seed=seed,
               workload_options={"n": 1024})
    cta = simulate(SimConfig(**sim, overlap=True)).per_device
    atc = simulate(SimConfig(**sim)).per_device
    np.testing.assert_allclose(traj, cta, rtol=2e-3, atol=1e-5)
    assert np.abs(cta - atc).max() > 1e-2 * np.abs(atc).max()  # another sequence
    assert traj[0].mean() > 1.0 and traj[-1].max() < 1e-3  # and it converges
    flags = _step_flags(tmp_path / "run", 4, "straggled")
    assert (flags == simulate(SimConfig(**sim, overlap=True)).straggled).all() and flags.any()


@pytest.mark.parametrize("overlap", [False, True])
def test_mix_every_mixes_on_every_nth_step_only_as_the_simulator(tmp_path, overlap):
    """mix_every=4: steps 3, 7, ... mix (and send), the others are local steps and send
    nothing. The processes' trajectory equals the simulator's with the same option, in both
    orders, and differs from mixing every step (so the option really changes the algorithm)."""
    steps, seed, every = 40, 4, 4
    cfg = {"strategy": {"name": "gossip", "options": {"full_batch": True, "topology": "ring",
                                                      "overlap": overlap, "mix_every": every}},
           "workload": {"name": "regression", "redundancy": 2, "options": {"n": 1024}},
           "workers": 4, "steps": steps, "lr": 0.1, "seed": seed, "stragglers": "0.3:2",
           "eval_every": 20, "progress": False, "out": str(tmp_path / "run")}
    res = tandem.train(cfg, timeout_s=240)["results"]
    traj = np.array([r["trajectory"] for r in res]).T  # (steps, 4)
    sim = dict(devices=4, d=2, p=0.3, steps=steps, lr=0.1, seed=seed, overlap=overlap,
               workload_options={"n": 1024})
    local = simulate(SimConfig(**sim, mix_every=every)).per_device
    np.testing.assert_allclose(traj, local, rtol=2e-3, atol=1e-5)
    every_step = simulate(SimConfig(**sim)).per_device
    assert np.abs(local - every_step).max() > 1e-2 * np.abs(every_step).max()
    sent = _step_values(tmp_path / "run", 4, "bytes_sent")  # (steps, 4)
    mixing = (np.arange(steps) + 1) % every == 0
    model = build_workload(WorkloadConfig(name="regression", options={"n": 1024})).model_fn()
    dim = sum(p.numel() for p in model.parameters())  # the flat x each neighbour gets
    assert (sent[~mixing] == 0).all()
    assert (sent[mixing] == 2 * 4 * dim).all()  # two ring neighbours, float32 parameters


def test_wait_mode_with_mix_every_holds_the_peers_before_each_mixing_only(tmp_path):
    """mode=wait's barrier makes everyone wait for the slowest before an exchange; with
    mix_every=4 the local steps between have no exchange, so no barrier (idle exactly 0)."""
    cfg = {"strategy": {"name": "gossip", "options": {"mode": "wait", "mix_every": 4}},
           "workload": {"name": "digits"}, "workers": 2, "steps": 8, "progress": False,
           "out": str(tmp_path / "run")}
    tandem.train(cfg)
    idle = _step_values(tmp_path / "run", 2, "idle_s")
    mixing = (np.arange(8) + 1) % 4 == 0
    assert (idle[~mixing] == 0).all() and (idle[mixing] > 0).all()


def test_overlap_is_refused_in_wait_mode(tmp_path):
    cfg = {"strategy": {"name": "gossip", "options": {"mode": "wait", "overlap": True}},
           "workload": {"name": "digits"}, "workers": 2, "steps": 2,
           "out": str(tmp_path / "run")}
    with pytest.raises(TandemError, match="overlap: mode=wait holds every peer at a barrier"):
        tandem.train(cfg)
    assert not (tmp_path / "run").exists()  # refused before any worker started


def test_deadline_mode_counts_late_gradients_as_stragglers(tmp_path):
    """Real lateness: an injected 30x delay misses a 0.3 s deadline; on-time peers do not."""
    steps = 16
    cfg = {"strategy": {"name": "gossip", "options": {
               "full_batch": True, "deadline_s": 0.3, "compute_floor_s": 0.02, "p": 0.25}},
           "workload": {"name": "regression", "redundancy": 2},
           "workers": 4, "steps": steps, "lr": 0.1, "seed": 1, "stragglers": "0.25:30",
           "eval_every": 8, "progress": False, "out": str(tmp_path / "run")}
    summary = tandem.train(cfg, timeout_s=240)
    late = _step_flags(tmp_path / "run", 4, "straggled")
    injected = _step_flags(tmp_path / "run", 4, "injected")
    assert injected.sum() >= 3
    assert late[injected].all()  # every 0.6 s delay missed the deadline
    assert late[~injected].mean() < 0.2  # on-time peers (0.02 s) rarely miss it
    evals = summary["results"][0]["evals"]
    assert evals[-1]["opt_error"] < 0.05 * evals[0]["opt_error"] + 1e-3


def test_coded_ps_recovers_the_exact_gradient_despite_stragglers(tmp_path):
    """Every server step equals full-batch gradient descent, though stragglers were skipped."""
    n, steps, lr, seed = 4, 12, 0.1, 2
    cfg = {"strategy": {"name": "coded_ps", "options": {"full_batch": True, "s": 1,
                                                         "compute_floor_s": 0.01}},
           "workload": {"name": "regression", "redundancy": 2},
           "workers": n, "steps": steps, "lr": lr, "seed": seed, "stragglers": "0.3:20",
           "eval_every": 6, "progress": False, "out": str(tmp_path / "run")}
    summary = tandem.train(cfg, timeout_s=240)
    server = summary["results"][-1]
    assert min(server["used_per_worker"]) < steps  # some worker's answer was not waited for
    run = tandem.load_config(cfg)
    work = build_workload(run.workload, seed)
    from tandem.trainer import build_model

    x = build_model(work, seed).weight.detach().double().numpy().reshape(-1)
    X, Y = work.train.x.double().numpy(), work.train.y.double().numpy().reshape(-1)
    ixs = [ix.numpy() for ix in data_partitions(work, n, "iid", 2, seed)]
    opt = work.optimum.double().numpy()
    want = []
    for _ in range(steps):
        g = sum(2.0 / len(ix) * X[ix].T @ (X[ix] @ x - Y[ix]) for ix in ixs)
        x = x - lr * g / n
        want.append(float(((x - opt) ** 2).sum()))
    np.testing.assert_allclose(server["trajectory"], want, rtol=1e-3, atol=1e-6)


def test_straggler_draws_reproduce_from_the_seed():
    s = StragglerConfig(p=0.4, factor=3.0)
    a = [ComputeFaults(r, 7, s).straggles(t) for r in range(5) for t in range(50)]
    b = [ComputeFaults(r, 7, s).straggles(t) for r in range(5) for t in range(50)]
    c = [ComputeFaults(r, 8, s).straggles(t) for r in range(5) for t in range(50)]
    assert a == b and a != c and 0.25 < np.mean(a) < 0.55


def test_simulated_error_floor_falls_with_d_and_rises_with_p():
    base = SimConfig(devices=32, steps=150, lr=0.05, topology="exponential",
                     workload_options={"noise": 1.0})
    rows = floor_table(study(base, ps=(0.1, 0.5), ds=(1, 3)))
    for row in rows:
        assert row["d=3"] < row["d=1"]
    assert rows[1]["d=1"] > rows[0]["d=1"]
    # wait-for-all has no straggler noise: below GOCO's floor at the same d
    wait = simulate(SimConfig(devices=32, steps=150, lr=0.05, topology="exponential", p=0.5,
                              mode="wait", workload_options={"noise": 1.0}))
    assert not wait.straggled.any() and wait.floor() < rows[1]["d=1"]


def test_sim_cli_writes_plot_and_table(tmp_path):
    from tandem.cli import app

    out = tmp_path / "sim"
    r = CliRunner().invoke(app, ["sim", "goco", "--devices", "16", "--steps", "20", "--p",
                                 "0.1,0.5", "--d", "1,2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "d=2" in r.output and (out / "goco.png").stat().st_size > 1000
    data = json.loads((out / "goco.json").read_text())
    assert len(data["curves"]) == 4 and len(data["curves"][0]["opt_error"]) == 20


def test_sim_cli_overlap_and_mix_every_run_other_orders_and_bad_values_are_refused(tmp_path):
    from tandem.cli import app

    args = ["sim", "goco", "--devices", "16", "--steps", "20", "--p", "0.3", "--d", "2"]
    curves = []
    for flag in ("--no-overlap", "--overlap"):
        out = tmp_path / flag
        r = CliRunner().invoke(app, [*args, flag, "--out", str(out)])
        assert r.exit_code == 0, r.output
        curves.append(json.loads((out / "goco.json").read_text())["curves"][0]["opt_error"])
    assert curves[0] != curves[1]  # same draws, another sequence
    r = CliRunner().invoke(app, [*args, "--mode", "wait", "--overlap",
                                 "--out", str(tmp_path / "w")])
    assert r.exit_code == 2 and "--overlap: True is not allowed; not with --mode wait" in r.output
    out = tmp_path / "every4"
    r = CliRunner().invoke(app, [*args, "--mix-every", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "goco.json").read_text())["curves"][0]["opt_error"] != curves[0]
    r = CliRunner().invoke(app, [*args, "--mix-every", "0", "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "--mix-every: 0 is not allowed; mix every 1 to 1000 steps" \
        in r.output


@pytest.mark.parametrize("mix_every", [1, 4])
def test_gossip_goes_on_without_a_killed_peer(tmp_path, mix_every):
    """Peer 2 of a 5-ring is SIGKILLed at step 8: the run completes, the survivors re-weight their
    mixing matrix at one agreed step and still reach consensus near the optimum; also when they
    mix on every 4th step only (the loss is then learnt from the store or a mixing's swap)."""
    steps, victim, world = 60, 2, 5
    cfg = {"strategy": {"name": "gossip", "options": {"full_batch": True, "topology": "ring",
                                                      "mix_every": mix_every}},
           "workload": {"name": "regression", "redundancy": 2},
           "workers": world, "steps": steps, "lr": 0.1, "seed": 3, "eval_every": 20,
           "inject_crash": [f"{victim}:8"], "timeout_s": 20, "progress": False,
           "out": str(tmp_path / "run")}
    summary = tandem.train(cfg, return_results=True, timeout_s=120)
    assert summary["lost_ranks"] == [victim]
    res = summary["results"]
    alive = [r for r in range(world) if r != victim]
    assert all(res[r]["steps"] == steps and res[r]["lost_peers"] == [victim] for r in alive)
    # every survivor switched to the re-weighted matrix at the same step
    infos = []
    for r in alive:
        recs = [json.loads(x) for x in (tmp_path / "run" / f"events.rank{r}.jsonl").read_text()
                .splitlines()]
        infos.append([x for x in recs if x.get("kind") == "info" and "gossip_reweighted" in x])
    assert all(len(i) == 1 and i[0]["gossip_reweighted"] == [victim] for i in infos)
    assert len({i[0]["at_step"] for i in infos}) == 1 and infos[0][0]["at_step"] > 8
    # consensus among the survivors, near the optimum (start ~ 20), evaluated locally
    xs = np.stack([torch.cat([p.reshape(-1) for p in res[r]["params"]]).numpy() for r in alive])
    assert ((xs - xs.mean(0)) ** 2).sum(1).max() < 1e-4
    assert max(res[r]["trajectory"][-1] for r in alive) < 1e-2
    final = res[0]["evals"][-1]
    assert final["local"] and final["survivors"] == 4 and final["opt_error"] < 1e-2
    # the re-weighted matrix is valid on the survivors; a split ring is refused
    make_topology("ring", world).without({victim}).check()
    with pytest.raises(TandemError, match="splits"):
        make_topology("ring", world).without({1, 3})


def test_nan_gradient_makes_the_peer_a_straggler_or_stops(tmp_path):
    """A NaN gradient never reaches the neighbours: skip turns the peer into a straggler for
    that step (counted), stop ends the run naming the rank and step."""
    base = {"strategy": {"name": "gossip", "options": {"mode": "goco", "full_batch": True}},
            "workload": {"name": "regression", "redundancy": 2}, "workers": 3, "steps": 12,
            "lr": 0.1, "seed": 0, "progress": False, "inject_nan": ["1:4"]}
    s = tandem.train(dict(base, nan_policy="skip", out=str(tmp_path / "skip")))
    assert s["results"][1]["skipped_steps"] == 1 and s["results"][0]["skipped_steps"] == 0
    assert s["results"][1]["straggled_steps"] >= 1
    assert s["final_test_loss"] == s["final_test_loss"]  # finite: not NaN
    with pytest.raises(WorkerFailed) as info:  # rank 1 first, never a neighbour's consequence
        tandem.train(dict(base, out=str(tmp_path / "stop")))  # (a connection it closed)
    assert str(info.value).startswith(
        "rank 1 failed: NonFiniteGradient: rank 1: non-finite gradient at step 4"), info.value


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-6), ("float16", 2e-3)])
def test_time_to_target_pays_for_the_averaged_model_and_model_pt_is_that_average(tmp_path, dtype,
                                                                                 atol):
    """The evaluated (and saved) gossip model is the peers' average, which no peer holds: one
    all-reduce of the parameters, timed alone in each evaluation (``averaging_s``), is added to
    the time to a target. model.pt is that average of the peers' final parameters (exact, or
    from the changes in float16)."""
    cfg = {"strategy": {"name": "gossip", "options": {"topology": "ring",
                                                       "average_dtype": dtype}},
           "workload": {"name": "digits"}, "workers": 4, "steps": 40, "lr": 0.1, "seed": 0,
           "eval_every": 10, "target_accuracy": 0.5, "progress": False,
           "out": str(tmp_path / "run")}
    s = tandem.train(cfg, return_results=True)
    records = [json.loads(line) for r in range(4) for line in
               (tmp_path / "run" / f"events.rank{r}.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 4 * 4 and all(r["averaging_s"] > 0 for r in evals)
    step = s["steps_to_target"]
    at = [r for r in evals if r["step"] == step]
    assert s["time_to_target_s"] == pytest.approx(
        max(r["wall"] for r in at) + max(r["averaging_s"] for r in at), abs=1e-9)
    assert s["averaging_to_target_s"] == max(r["averaging_s"] for r in at)  # its share, said
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=False)["average_dtype"] == dtype
    saved = [q.detach() for q in tandem.load_model(tmp_path / "run").parameters()]
    peers = [res["params"] for res in s["results"]]
    assert len(saved) == len(peers[0])
    for i, q in enumerate(saved):
        torch.testing.assert_close(q, torch.stack([p[i] for p in peers]).mean(0), rtol=0,
                                   atol=atol)


def test_float16_average_halves_the_bytes_within_its_error_bound():
    """``average_dtype=float16``: the changes since the shared origin travel in half precision,
    scaled so that a large one does not overflow. Breaks if the mean is off by more than the
    documented ``world * 2**-10`` of the largest change, if an unmoved parameter is not returned
    exactly, or if the bytes are not half the exact all-reduce's (plus one scalar)."""
    world = 3
    res = spawn(jobs.half_average, world, timeout_s=60)
    for r in res:
        assert r["finite"] and r["dtype"] == "torch.float32" and r["unmoved_exact"]
        assert 0 < r["err"] <= world * 2.0 ** -10 * r["peak"]
        assert r["exact_bytes"] == costs.all_reduce(5000 * 4, world).sent
        assert r["half_bytes"] == (costs.all_reduce(5000 * 2, world).sent
                                   + costs.all_reduce(8, world).sent)
    assert half_scale(0.0, 4) == half_scale(float("nan"), 4) == 1.0
    assert half_scale(1.0, 4) == 2.0 ** 12 and half_scale(3.0, 4) == 2.0 ** 10
