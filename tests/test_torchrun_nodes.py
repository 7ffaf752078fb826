"""Every strategy across machines under torchrun: two node agents on loopback
(``--nnodes 2 --node_rank 0/1``) run each strategy to completion and, where the method is
deterministic, reach exactly the local launcher's model. (param_server's placement over nodes
has its own test in tests/test_ps_pulls.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import tandem

TORCHRUN = Path(sys.executable).with_name("torchrun")
BASE = {"workload": {"name": "digits", "options": {"hidden": 32}}, "steps": 8,
        "batch_size": 16, "lr": 0.1, "seed": 5, "progress": False, "eval_every": 100}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_agents(cfg: dict, per_node: int, tmp: Path, timeout: float = 240) -> list[str]:
    """Run ``tandem worker`` under two torchrun node agents; return their outputs. Every process
    is reaped whatever happens (each agent leads its own process group)."""
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    env = dict(os.environ, TMPDIR=str(tmp))  # torchelastic's folders go with the test's
    agents = [subprocess.Popen(
        [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node",
         str(per_node), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "tandem.cli", "worker", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp, env=env,
        start_new_session=True) for r in (0, 1)]
    try:
        outs = [a.communicate(timeout=timeout)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    for a, out in zip(agents, outs, strict=True):
        assert a.returncode == 0, out[-3000:]
    return outs


def _steps(run: Path, rank: int) -> int:
    lines = (run / f"events.rank{rank}.jsonl").read_text().splitlines()
    return sum(json.loads(line)["kind"] == "step" for line in lines)


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


CASES = {
    "allreduce": ({"strategy": "allreduce", "workers": 4}, 2, True),
    "gossip": ({"strategy": {"name": "gossip", "options": {"topology": "ring"}},
                "workers": 4}, 2, True),
    "coded_ps": ({"strategy": {"name": "coded_ps", "options": {"s": 0}}, "workers": 3}, 2,
                 True),
    "pipeline": ({"strategy": {"name": "pipeline",
                               "options": {"models": [{"lr": 0.05}, {"lr": 0.2}]}},
                  "workers": 2}, 1, True),
    # one agent per node over that node's worker (its shared memory): timing decides which
    # gradient lands in which superstep, so completion and the gradient budget are checked
    "bsp_shared": ({"strategy": {"name": "bsp_shared",
                                 "options": {"grads_per_superstep": 2}}, "workers": 2}, 2,
                   False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_strategy_across_two_torchrun_nodes(name, tmp_path):
    over, per_node, deterministic = CASES[name]
    cfg = {**BASE, **over, "out": str(tmp_path / "tr")}
    two_node_agents(cfg, per_node, tmp_path)
    summary = json.loads((tmp_path / "tr" / "summary.json").read_text())
    assert summary["strategy"] == name
    if name == "pipeline":
        runs = [(tmp_path / "tr" / "variants" / v) for v in ("lr=0.05", "lr=0.2")]
    else:
        runs = [tmp_path / "tr"]
    if not deterministic:  # bsp_shared: local rank 0 of each node is its machine's agent
        assert summary["info"]["bsp_machines"] == 2
        grads = sum(_steps(tmp_path / "tr", rank) for rank in (1, 3))  # the two workers
        assert grads >= cfg["steps"] * cfg["workers"]  # the whole gradient budget was applied
        assert (tmp_path / "tr" / "model.pt").is_file()
        return
    local = dict(cfg, out=str(tmp_path / "local"))
    tandem.train(local)
    for run in runs:
        mirror = tmp_path / "local" / run.relative_to(tmp_path / "tr")
        _same(_state(run), _state(mirror))


def test_a_world_that_does_not_fit_is_refused_before_joining(tmp_path):
    cfg = {**BASE, "strategy": "gossip", "workers": 3, "out": str(tmp_path / "tr")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    agents = [subprocess.Popen(
        [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "tandem.cli",
         "worker", "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmp_path)),
        start_new_session=True) for r in (0, 1)]
    try:
        outs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    assert all(a.returncode != 0 for a in agents)
    assert "runs 3 processes, but this job has 2" in outs[0]
    assert "elastic membership is not supported" in outs[0]


def test_gossip_under_torchrun_goes_on_when_a_node_is_lost(tmp_path):
    """Rank 3 SIGKILLs itself at step 10; its node's agent then stops rank 2. With no launcher
    to mark the dead, rank 0 and rank 1 learn it from their neighbours' closed sockets, drop
    them, and finish all their steps; rank 0 waits for who finished (not for the dead), lists
    the lost ranks in the summary and says why its torchrun still waits (torch's exit barrier
    for the lost node's agent: 300 s, which the test does not sit out)."""
    steps = 300
    cfg = {**BASE, "strategy": {"name": "gossip", "options": {"topology": "ring"}},
           "workers": 4, "steps": steps, "inject_crash": [[3, 10]],
           "out": str(tmp_path / "tr")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    agents = []
    try:
        for r in (0, 1):
            with logs[r].open("w") as log:
                agents.append(subprocess.Popen(
                    [str(TORCHRUN), "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node",
                     "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m",
                     "tandem.cli", "worker", "--config", str(path)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                    env=dict(os.environ, TMPDIR=str(tmp_path)), start_new_session=True))
        deadline = time.monotonic() + 180
        while "note: ranks" not in logs[0].read_text() and time.monotonic() < deadline \
                and agents[0].poll() is None:
            time.sleep(0.5)
        assert agents[1].wait(timeout=60) != 0  # the lost node's agent fails
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
                a.wait()
    out = logs[0].read_text()
    assert "note: ranks [2, 3] were lost" in out, out[-3000:]
    summary = json.loads((tmp_path / "tr" / "summary.json").read_text())
    assert summary["lost_ranks"] == [2, 3]
    assert [_steps(tmp_path / "tr", r) for r in (0, 1)] == [steps, steps]
    assert (tmp_path / "tr" / "model.pt").is_file()
