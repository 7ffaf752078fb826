"""bench.kill_resume's multi-node trial: a worker killed on one host of a torchrun job across
network namespaces; the job must restart (``torchrun --max-restarts 1``) and resume to the same
final model as an uninterrupted run.

Hosts are :class:`bench.netns.Cluster` namespaces behind a switch (100 Mbit/s ``tbf`` links), one
``torchrun --nnodes H --node_rank I --rdzv-backend c10d --rdzv-endpoint <host 0>:<port>`` per
host, one worker each, every host's files on the same disk (as a shared file system would be).
Worker 1 kills itself with SIGKILL at ``kill_step`` (``inject_crash``); its host's agent and the
others' (whose workers lose their peer in the next collective) re-rendezvous, the restarted
workers find ``checkpoints/LATEST`` (``TORCHELASTIC_RESTART_COUNT`` > 0) and resume. The trial
checks that the crash happened (exit code -9 in host 1's log), that every torchrun ended with
0, and compares the final test loss with a run of the same config under the local launcher.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.harness import CHILD_PYTHONPATH

RATE = "100mbit"


def torchrun_kill_trial(cfg: dict[str, Any], kill_step: int, tmp: Path, hosts: int = 2,
                        limit_s: float = 300.0) -> dict[str, Any]:
    """One trial; returns the row (``ok``, ``outcome``, ``loss_diff``, ``resumed_from``...)."""
    import tandem
    from bench.cluster_run import first_error, run_on_hosts
    from bench.netns import Cluster

    base = dict(cfg, workers=hosts, progress=False)
    ref = tandem.train(dict(base, out=str(tmp / "ref")), timeout_s=limit_s)
    run = dict(base, out=str(tmp / "tr"), inject_crash=[[1, kill_step]])
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    row: dict[str, Any] = {"strategy": cfg["strategy"], "role": f"torchrun node ({hosts} netns)",
                           "victim": 1, "kill_step": kill_step, "ok": False}
    port = 29400 + os.getpid() % 500
    t0 = time.monotonic()
    with Cluster(hosts, RATE) as net:
        env = dict(os.environ, GLOO_SOCKET_IFNAME=net.hosts[0].dev, OMP_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", PYTHONPATH=CHILD_PYTHONPATH)
        env.pop("TANDEM_STORE_HOSTED", None)
        argvs = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(hosts),
                  "--node_rank", str(i), "--nproc_per_node", "1", "--max-restarts", "1",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{net.hosts[0].addr}:{port}",
                  "--rdzv-id", f"kill-{os.getpid()}",
                  # host 0's agent hosts the store, and each agent names its own address
                  # (c10d would go by the machine's hostname, the same in every namespace)
                  "--rdzv-conf", f"is_host={int(i == 0)}", "--local-addr", net.hosts[i].addr,
                  "-m", "tandem.cli", "worker", "--config", str(path)] for i in range(hosts)]
        codes, timed_out = run_on_hosts(net, argvs, env, tmp, tmp, limit_s)
    row["run_s"] = round(time.monotonic() - t0, 1)
    texts = [(tmp / f"host{i}.log").read_text(errors="replace") for i in range(hosts)]
    crashed = "exitcode: -9" in texts[1] or "Signals.SIGKILL" in texts[1]
    summary_path = tmp / "tr" / "summary.json"
    if timed_out:
        row["outcome"] = "hang"
    elif any(c != 0 for c in codes):
        bad = next(i for i, c in enumerate(codes) if c != 0)
        row["outcome"] = f"torchrun on host {bad} exited {codes[bad]}: {first_error(texts[bad])}"
    elif not crashed:
        row["outcome"] = "the injected crash did not happen (no exit code -9 in host 1's log)"
    elif not summary_path.is_file():
        row["outcome"] = "no summary.json after the restart"
    else:
        got = json.loads(summary_path.read_text())
        row["loss_diff"] = abs(got["final_test_loss"] - ref["final_test_loss"])
        row["resumed_from"] = _resumed_from(tmp / "tr")
        row["ok"] = row["resumed_from"] is not None and row["loss_diff"] <= 1e-6
        row["outcome"] = "restarted and resumed" if row["ok"] else \
            f"restarted; final test loss differs by {row['loss_diff']:.3g}"
    return row


def _resumed_from(run_dir: Path) -> int | None:
    """The step the restarted job resumed from: the ``resume`` record of rank 0's event log
    (:meth:`tandem.telemetry.recorder.Recorder.resume_from`); None when there is none."""
    for events in sorted(run_dir.glob("events*.jsonl")):
        for line in events.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("kind") == "resume" and e.get("step") is not None:
                return int(e["step"])
    return None
