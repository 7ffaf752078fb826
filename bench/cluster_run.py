"""bench.cluster's rows and one run of a row: on the real links (a torchrun per network
namespace) and on the emulated link (one machine, loopback). See :mod:`bench.cluster`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bench.cpu_window import CpuSampler, cpu_spent, cpu_ticks, steps_cpu, steps_window
from bench.harness import CHILD_PYTHONPATH, ROOT
from bench.netns import Cluster
from bench.p2p import ALL_REDUCE, BIDIRECTIONAL, result_name
from bench.pinning import pinned_argv, ranks_pinned

P2P_RESULTS = Path(__file__).resolve().parent / "results"


def measured_duplex(rate: str, hosts: int = 4) -> tuple[float, str]:
    """The emulated twin's ``duplex`` at ``rate``: the median, over bench/p2p's bidirectional
    patterns, of the real links' median rep over the pattern's line time, from the committed
    ``bench/results/p2p[_<rate>][_<N>hosts].json`` of the same number of hosts (else the four
    hosts' file, which the source then says); ``(1.0, why)`` when there is no measurement."""
    return _p2p_factor(rate, hosts, BIDIRECTIONAL, "bidirectional patterns")


def measured_collective(rate: str, hosts: int = 4) -> tuple[float, str]:
    """The emulated twin's ``collective`` at ``rate``: bench/p2p's all-reduce on the real links,
    its median rep over the ring's model; ``(1.0, why)`` when it was not measured."""
    return _p2p_factor(rate, hosts, (ALL_REDUCE,), "all-reduce")


def _p2p_factor(rate: str, hosts: int, patterns: tuple[str, ...],
                what: str) -> tuple[float, str]:
    path, other = P2P_RESULTS / f"{result_name(rate, hosts)}.json", ""
    if not path.exists() and hosts != 4:
        path = P2P_RESULTS / f"{result_name(rate)}.json"
        other = f"measured with 4 hosts, not {hosts}: "
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return 1.0, f"no bench/p2p result at {rate} ({path.name}): an ideal full-duplex link"
    ratios = sorted(r["real median/model"] for r in rows
                    if r.get("pattern") in patterns and r.get("real median/model"))
    if not ratios:
        return 1.0, f"{path.name} has no real-link {what} rows: an ideal full-duplex link"
    value = round(max(1.0, ratios[len(ratios) // 2]), 2)
    return value, (f"{other}the median of bench/p2p's {what} on the real links at {rate} "
                   f"({', '.join(f'{x:.2f}' for x in ratios)}x the model; "
                   f"bench/results/{path.name})")


@dataclass(frozen=True)
class Row:
    """One configuration: a Tandem strategy + codec, a DDP hook, or the compute-only run."""

    key: str  # what --only matches
    system: str  # the table's label
    kind: str  # tandem | ddp | local
    strategy: str = "allreduce"
    codec: str = "dense"
    codec_opts: dict[str, Any] = field(default_factory=dict)
    strategy_opts: dict[str, Any] = field(default_factory=dict)
    sgd_opts: dict[str, Any] = field(default_factory=dict)  # options of the CNN's SGD
    steps_factor: int = 1  # this row runs the workload's steps x this
    hook: str | None = None
    workers: int | None = None  # None: one per host (the config's default)


@dataclass(frozen=True)
class Units:
    """What a row's per-step columns divide by: ``steps`` (model updates), ``senders`` (the
    processes its communication is averaged over) and the bytes each sends per step."""

    steps: int | None
    senders: int | None
    bytes_per_step: float | None


def units(summary: dict[str, Any]) -> Units:
    """A run's :class:`Units`. Every strategy updates the model once a step, except
    ``bsp_shared``: there a step of the summary is one worker's gradient (the fastest worker's
    count), so time per step would be the workers' compute speed, whatever the link. Its unit
    is the *superstep* (one exchange between the agents and one update), and only its agents,
    one per machine, send."""
    info = summary.get("info") or {}
    if info.get("bsp_supersteps"):
        steps, machines = int(info["bsp_supersteps"]), int(info["bsp_machines"])
        return Units(steps, machines, summary["bytes_sent_total"] / (machines * steps))
    return Units(summary.get("steps"), summary.get("ranks") or summary.get("workers"),
                 summary.get("bytes_sent_per_worker_per_step"))


def step_s(res: dict[str, Any] | None) -> float | None:
    if not res or "error" in res:
        return None
    if "step_s" in res:
        return res["step_s"]
    s = res["summary"]
    steps = units(s).steps
    return s["wall_time_s"] / steps if steps else None


def comm_s(res: dict[str, Any] | None, row: Row) -> float | None:
    """Mean communication seconds per rank and step (the strategy's own split; DDP and local
    record none); for ``bsp_shared`` per machine and superstep (:func:`units`)."""
    if row.kind != "tandem" or not res or "error" in res:
        return None
    u = units(res["summary"])
    n = (u.senders or 0) * (u.steps or 0)
    return res["summary"].get("comm_s_total", 0.0) / n if n else None


def float16_average(row: Row) -> Row:
    """``row`` with gossip's network average assembled from float16 changes
    (``average_dtype=float16``: half the bytes of the one all-reduce that the time to a target
    pays for)."""
    return replace(row, key=f"{row.key}-avg16", system=f"{row.system}, float16 average",
                   strategy_opts={**row.strategy_opts, "average_dtype": "float16"})


def mixing_every(row: Row, n: int) -> Row:
    """``row`` mixing with the neighbours on every ``n``-th step only (``mix_every``: the steps
    between are local; 1/n of the gossip bytes)."""
    return replace(row, key=f"{row.key}-mix{n}", system=f"{row.system}, mix every {n}",
                   strategy_opts={**row.strategy_opts, "mix_every": n})


def rows_for(hosts: int, workload: str) -> list[Row]:
    lr = 0.05 if workload == "cnn" else 3e-3
    # a codec under gossip (CHOCO: compressed model differences, its default step)
    gossip_topk = Row("gossip-topk", "gossip goco ring topk 0.01", "tandem", strategy="gossip",
                      codec="topk", codec_opts={"ratio": 0.01})
    gossip_signsgd = Row("gossip-signsgd", "gossip goco ring signsgd", "tandem",
                         strategy="gossip", codec="signsgd")
    gossip_topk3 = Row("gossip-topk0.001", "gossip goco ring topk 0.001", "tandem",
                       strategy="gossip", codec="topk", codec_opts={"ratio": 0.001})
    gossip_topk3_overlap = Row("gossip-topk0.001-overlap", "gossip goco ring topk 0.001 overlap",
                               "tandem", strategy="gossip", codec="topk",
                               codec_opts={"ratio": 0.001}, strategy_opts={"overlap": True})
    return [
        Row("local", "local (compute only)", "local", strategy="local"),
        Row("ddp", "ddp", "ddp", hook="none"),
        Row("ddp-fp16", "ddp + fp16 hook", "ddp", hook="fp16"),
        Row("ddp-powersgd", "ddp + powersgd r2", "ddp", hook="powersgd"),
        Row("dense", "allreduce dense", "tandem"),
        Row("fp16", "allreduce fp16", "tandem", codec="fp16"),
        Row("topk", "allreduce topk 0.01", "tandem", codec="topk", codec_opts={"ratio": 0.01}),
        Row("powersgd", "allreduce powersgd r2", "tandem", codec="powersgd",
            codec_opts={"rank": 2}),
        Row("powersgd-r1", "allreduce powersgd r1", "tandem", codec="powersgd",
            codec_opts={"rank": 1}),
        # delay=1: the exchange overlaps the next step's compute (one step stale)
        Row("topk-delay", "allreduce topk 0.01 delay=1", "tandem", codec="topk",
            codec_opts={"ratio": 0.01}, strategy_opts={"delay": 1}),
        Row("powersgd-delay", "allreduce powersgd r2 delay=1", "tandem", codec="powersgd",
            codec_opts={"rank": 2}, strategy_opts={"delay": 1}),
        Row("powersgd-r1-delay", "allreduce powersgd r1 delay=1", "tandem", codec="powersgd",
            codec_opts={"rank": 1}, strategy_opts={"delay": 1}),
        # delay=1 with Nesterov momentum (spike compensation; bench/delay.py) and predict (the
        # default since 2026-12-05), beside the same codecs without delay on that optimizer
        *([Row(f"{key}-nesterov", f"{system} nesterov", "tandem", codec=codec,
               codec_opts=opts, strategy_opts=delay, sgd_opts={"nesterov": True})
           for key, system, codec, opts, delay in [
               ("topk", "allreduce topk 0.01", "topk", {"ratio": 0.01}, {}),
               ("topk-delay", "allreduce topk 0.01 delay=1", "topk", {"ratio": 0.01},
                {"delay": 1}),
               ("powersgd-r1", "allreduce powersgd r1", "powersgd", {"rank": 1}, {}),
               ("powersgd-r1-delay", "allreduce powersgd r1 delay=1", "powersgd",
                {"rank": 1}, {"delay": 1})]] if workload == "cnn" else []),
        Row("qsgd", "allreduce qsgd", "tandem", codec="qsgd"),
        # one server per host, a shard each (textlm's AdamW factory runs on the workers under
        # local_step=auto, so its servers only average and may hold shards too)
        Row("param_server", "param_server candidate", "tandem", strategy="param_server",
            strategy_opts={"servers": hosts}),
        *([Row("param_server-sync", "param_server sync", "tandem", strategy="param_server",
               strategy_opts={"servers": hosts, "mode": "sync"}),  # the candidate's baseline
           # a candidate step is a fraction of a sync one, and it needs more of them: 200 steps
           # stop it before 0.95 (bench/param_server.py: 529 steps on this CNN at 10 Mbit/s)
           Row("param_server-long", "param_server candidate, 4x steps", "tandem",
               strategy="param_server", strategy_opts={"servers": hosts}, steps_factor=4)]
          if workload == "cnn" else []),
        Row("bsp_shared", "bsp_shared", "tandem", strategy="bsp_shared",
            strategy_opts={"machines": hosts}),
        # what its docs advise across slow links: the agents' exchange compressed
        Row("bsp-powersgd", "bsp_shared powersgd r2", "tandem", strategy="bsp_shared",
            codec="powersgd", codec_opts={"rank": 2}, strategy_opts={"machines": hosts}),
        Row("gossip", "gossip goco ring", "tandem", strategy="gossip"),
        gossip_topk,
        gossip_signsgd,
        # the exchange beside the gradient (overlap=true), and top-k's density swept down
        Row("gossip-topk-overlap", "gossip goco ring topk 0.01 overlap", "tandem",
            strategy="gossip", codec="topk", codec_opts={"ratio": 0.01},
            strategy_opts={"overlap": True}),
        gossip_topk3,
        gossip_topk3_overlap,
        *[float16_average(r) for r in (gossip_topk, gossip_signsgd, gossip_topk3)],
        # local steps between mixings: a fraction of the bytes, with and without overlap, and
        # with the denser codecs, whose mixings carry more
        *[mixing_every(float16_average(r), n) for r in (gossip_topk3, gossip_topk3_overlap)
          for n in (4, 8)],
        *[mixing_every(float16_average(r), 4) for r in (gossip_topk, gossip_signsgd)],
        Row("coded_ps", "coded_ps", "tandem", strategy="coded_ps"),
        Row("pipeline", "pipeline 2 models", "tandem", strategy="pipeline",
            strategy_opts={"models": [{"lr": lr}, {"lr": 2 * lr}]}),
        # its option one_at_a_time, against the default (concurrent exchanges)
        Row("pipeline-turns", "pipeline 2 models, one exchange at a time", "tandem",
            strategy="pipeline", strategy_opts={"models": [{"lr": lr}, {"lr": 2 * lr}],
                                                "one_at_a_time": True}),
    ]


# ---- one run -------------------------------------------------------------------------------
def first_error(text: str) -> str:
    """The first line that says what went wrong in a worker's or torchrun's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # Tandem's CLI: one line "error: ..."
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    pat = re.compile(r"^(?:\[rank\d+\]:\s*)?([\w.]*(?:Error|Exception|Failed|Interrupt)\w*:.*)$")
    for ln in lines:
        m = pat.match(ln)
        if m and "ChildFailedError" not in ln and "elastic" not in ln:
            return m.group(1)
    for key in ("enforce fail", "what():", "terminate called"):  # a C++ abort (gloo's
        for ln in lines:  # enforce), which prints no Python traceback
            if key in ln:
                return ln
    worded = [ln for ln in lines if re.search(r"[A-Za-z]", ln)]  # not torchrun's ==== banner
    return worded[-1] if worded else "no output"


def per_host(procs: int, hosts: int) -> list[int]:
    """``procs`` processes over ``hosts`` hosts, as even as possible (host 0 first)."""
    return [procs // hosts + (1 if i < procs % hosts else 0) for i in range(hosts)]


def wait_all(procs: list[subprocess.Popen], limit_s: float, grace_s: float = 20.0
             ) -> tuple[list[int | None], bool]:
    """Wait for every process; once one fails the others get ``grace_s`` to finish. Returns the
    exit codes (None: still running when given up on) and whether the limit was hit."""
    deadline = time.monotonic() + limit_s
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes, False
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > grace_s):
            return codes, now > deadline
        time.sleep(0.2)


def run_on_hosts(net: Cluster, argvs: list[list[str]], env: dict[str, str], cwd: Path,
                 log_dir: Path, limit_s: float) -> tuple[list[int | None], bool]:
    """Start ``argvs[i]`` in host ``i``'s namespace (output to ``log_dir/host<i>.log``), wait
    for all of them (see :func:`wait_all`) and reap whatever is left."""
    procs, logs = [], []
    try:
        for i, argv in enumerate(argvs):
            log = open(log_dir / f"host{i}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(net.popen(i, argv, env=env, cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT))
        return wait_all(procs, limit_s)
    finally:
        for p in procs:
            net.reap(p)
        for log in logs:
            log.close()


def write_config(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_real(net: Cluster, row: Row, cfg: dict[str, Any], row_dir: Path, port: int,
             limit_s: float, pin: bool = False) -> dict[str, Any]:
    """One row on the real links: a torchrun per host; its summary and wire counters. ``pin``
    runs host ``i``'s processes (torchrun and its workers, which inherit the affinity) on core
    ``i`` alone."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME=net.hosts[0].dev, OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=CHILD_PYTHONPATH)
    env.pop("TANDEM_STORE_HOSTED", None)
    n = len(net.hosts)
    if row.kind == "local":
        cfgs = [write_config(dict(cfg, workers=1, out=str(row_dir / f"run_h{i}")),
                             row_dir / f"cfg_h{i}.yaml") for i in range(n)]
        argvs = [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node", "1", "-m", "tandem.cli", "worker", "--config", str(c)]
                 for c in cfgs]
    else:
        cfg_path = write_config(dict(cfg, out=str(row_dir / "run")), row_dir / "cfg.yaml")
        counts = per_host(processes(cfg), n)
        if row.kind == "ddp":
            target = [str(ROOT / "bench" / "ddp_cluster_job.py"), "--config", str(cfg_path),
                      "--hook", str(row.hook)]
        else:
            target = ["-m", "tandem.cli", "worker", "--config", str(cfg_path)]
        argvs = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n),
                  "--node_rank", str(i), "--nproc_per_node", str(counts[i]), "--master_addr",
                  net.hosts[0].addr, "--master_port", str(port), "--max_restarts", "0",
                  *target] for i in range(n)]
    if pin:
        argvs = pinned_argv(argvs)
    before, drops0, cpu0 = net.counters(), net.qdisc_drops(), cpu_ticks()
    t0 = time.monotonic()
    with CpuSampler() as sampler:
        codes, timed_out = run_on_hosts(net, argvs, env, ROOT, row_dir, limit_s)
    took = time.monotonic() - t0
    cpu = cpu_spent(cpu0, cpu_ticks())
    after, drops = net.counters(), net.qdisc_drops() - drops0
    out: dict[str, Any] = {"codes": codes, "run_s": took, "drops": drops, "cpu_s": cpu,
                           "tx_bytes": sum(a["tx_bytes"] - b["tx_bytes"]
                                           for a, b in zip(after, before, strict=True))}
    if timed_out or any(c != 0 for c in codes):
        texts = [(row_dir / f"host{i}.log").read_text(errors="replace") for i in range(n)]
        bad = [i for i, c in enumerate(codes) if c not in (0,)]
        first = next((first_error(texts[i]) for i in bad if texts[i].strip()), "no output")
        out["error"] = (f"timed out after {limit_s:.0f} s; " if timed_out else "") + first
        return out
    if row.kind == "local":
        sums = [json.loads((row_dir / f"run_h{i}" / "summary.json").read_text())
                for i in range(n)]
        out["summary"] = sums[0]
        out["step_s"] = sum(s["wall_time_s"] / s["steps"] for s in sums) / n
    else:
        out["summary"] = json.loads((row_dir / "run" / "summary.json").read_text())
    out["steps_cpu"] = steps_cpu(sampler.samples, steps_window(
        row_dir / ("run_h0" if row.kind == "local" else "run")))
    return out


def processes(cfg: dict[str, Any]) -> int:
    """How many processes the row's strategy runs (a parameter server adds its servers)."""
    from tandem.config import load_config
    from tandem.resolve import resolve

    c = load_config(cfg)
    return resolve(c).strategy.processes(c)


def run_emulated(row: Row, cfg: dict[str, Any], row_dir: Path, net_spec: str,
                 limit_s: float, pin_hosts: int | None = None) -> dict[str, Any]:
    """The same row on one machine, loopback + Tandem's link emulator; ``pin_hosts``: rank
    ``r`` on usable core ``r % pin_hosts`` (:func:`bench.pinning.ranks_pinned`)."""
    import tandem
    from tandem.launch import spawn

    data = dict(cfg, net=net_spec, out=str(row_dir / "emu"))
    t0, cpu0 = time.monotonic(), cpu_ticks()
    try:
        with ranks_pinned(pin_hosts or 1, enabled=pin_hosts is not None), \
                CpuSampler() as sampler:
            if row.kind == "ddp":
                from bench.ddp_cluster_job import job

                summary = spawn(job, int(cfg["workers"]), data, row.hook, timeout_s=limit_s)[0]
            else:
                summary = tandem.train(data, timeout_s=limit_s)
    except Exception as err:  # noqa: BLE001 - a failed row is reported, never dropped
        return {"error": first_error(f"{type(err).__name__}: {err}"),
                "run_s": time.monotonic() - t0, "cpu_s": cpu_spent(cpu0, cpu_ticks())}
    return {"summary": summary, "run_s": time.monotonic() - t0,
            "cpu_s": cpu_spent(cpu0, cpu_ticks()),
            "steps_cpu": steps_cpu(sampler.samples, steps_window(row_dir / "emu"))}


def cpu_ms_per_step(res: dict[str, Any] | None, steps: int | None) -> dict[str, float | None]:
    """A run's machine-wide CPU per step, whole run (start-up and evaluation included), in ms:
    ``cpu`` (user + system + softirq) and ``softirq`` alone."""
    cpu = (res or {}).get("cpu_s")
    if not cpu or not steps:
        return {"cpu": None, "softirq": None}
    return {"cpu": round(1e3 * (cpu["user"] + cpu["system"] + cpu["softirq"]) / steps, 2),
            "softirq": round(1e3 * cpu["softirq"] / steps, 2)}
