"""Real links between hosts: Tandem and PyTorch DDP across network namespaces, against the emulator.

    sudo .venv/bin/python -m bench.cluster             # full: the tables in docs/cluster.md
    sudo .venv/bin/python -m bench.cluster --quick     # make bench: 10 Mbit/s, CNN, 7 rows
    .venv/bin/python -m bench.cluster [--rates 10mbit,100mbit] [--workloads cnn,textlm]
        [--only dense,ddp,...] [--hosts 4] [--pin] [--runs runs/bench-cluster] [--merge]
    sudo .venv/bin/python -m bench.cluster --hosts 2 --pin  # a core per host: cluster_2hosts_pinned
    .venv/bin/python -m bench.cluster --rescore      # recompute the targets from the kept rows

Hosts are network namespaces behind a switch namespace (:mod:`bench.netns`): one veth pair per
host, limited both ways by ``tc tbf`` at ``--rates`` with a burst of 3.3 ms of line rate. Every
row is one ``torchrun --nnodes N --node_rank I --master_addr <host 0> ...`` per namespace
(``GLOO_SOCKET_IFNAME`` = the host's veth), started with ``ip netns exec``:

* ``allreduce <codec>``: ``-m tandem.cli worker --config cfg.yaml`` with dense, fp16, top-k 1 %,
  PowerSGD rank 2 and rank 1, and QSGD; top-k and PowerSGD also with ``delay=1`` (the exchange
  overlapping the next step's compute, one step stale); on the CNN top-k and PowerSGD rank 1
  also with Nesterov momentum, with and without ``delay=1`` (``... nesterov``: the optimizer
  ``bench/delay.py`` found to make the delayed steps train);
* ``ddp``, ``ddp + fp16 hook``, ``ddp + powersgd r2``: ``bench/ddp_cluster_job.py`` (plain torch
  DDP, torch's ``fp16_compress_hook``, torch's ``powerSGD_hook``) on the same model, shards, seeds,
  optimizer and steps;
* the other strategies (param_server, bsp_shared, gossip, coded_ps, pipeline) with the dense codec
  (param_server in candidate mode; on the CNN also in sync mode, ``param_server-sync``, and the
  candidate with 4x the steps, ``param_server-long``, since 200 of its cheap steps end short of
  0.95):
  a strategy that fails under torchrun is a ``FAILED`` row with its error's first line;
  ``bsp_shared`` also with PowerSGD rank 2 between its agents (``bsp-powersgd``); the
  pipeline also with one exchange on the link at a time (``pipeline-turns``,
  ``one_at_a_time=true``) against its default of concurrent exchanges; ``gossip`` also with
  top-k 1 % and signSGD (CHOCO: compressed model differences; ``gossip-topk``,
  ``gossip-signsgd``), top-k 0.1 % (``gossip-topk0.001``) and both top-k densities with the
  exchange beside the gradient (``overlap=true``: ``gossip-topk-overlap``,
  ``gossip-topk0.001-overlap``), and the three compressed ones with the network average
  assembled from float16 changes (``average_dtype=float16``: ``gossip-topk-avg16``,
  ``gossip-signsgd-avg16``, ``gossip-topk0.001-avg16``), and top-k 0.1 % with that average
  mixing on every 4th and 8th step only, local steps between (``mix_every``:
  ``gossip-topk0.001-avg16-mix4``, ``-mix8``), with and without overlap
  (``gossip-topk0.001-overlap-avg16-mix4``, ``-mix8``), and top-k 1 % and signSGD so mixing
  on every 4th step (``gossip-topk-avg16-mix4``, ``gossip-signsgd-avg16-mix4``);
* ``local``: the compute-only limit, one single-process run per host, all hosts at once (the same
  CPU contention as the 4-host rows; no emulated twin: it sends nothing).

Each row (but ``local``) then runs once more on one machine over loopback with the link emulator
(``tandem.train`` with ``net="<rate>:<latency>,hosts=<hosts>"``, latency half the measured TCP
round trip, the processes of a host sharing its link as on the namespaces; a
DDP row runs ``bench/ddp_cluster_job.py`` under Tandem's launcher, its buckets through
``tandem.codecs.ddp_hook`` with the matching Tandem codec, since torch's own hooks bypass the
emulator). Real and emulated runs of a row are back to back, so machine load hits both alike.

Workloads: ``cnn`` is mnist5k's CNN with ``hidden=360`` (201,538 parameters; batch 32, SGD lr
0.05 momentum 0.9, evaluated every 10 steps, target 0.95 test accuracy); ``textlm`` the default
byte-level transformer (867,072 parameters, its own AdamW recipe; time per step only).

Columns: ``step_ms`` (training wall time / steps, evaluation excluded, real links), ``emu_step_ms``
(same, emulated), ``emu_err`` = |emulated - real| / real, ``time_to_target_s`` / ``steps_to_target``
(first evaluation at >= 0.95), ``final`` (test accuracy; token accuracy for textlm), ``bytes/step``
(Tandem's byte meter: payload bytes sent per worker per step), ``wire/step`` (the kernel's veth
counters: every byte each host sent, TCP/IP headers, retransmissions, rendezvous and evaluation
included, per host per step), ``drops`` (packets the token buckets dropped), ``vs_ddp`` (plain
DDP's step time / this row's, same rate and workload), ``emu_net`` (JSON only: the emulated
twin's ``net``, with the ``duplex`` and ``collective`` it took from bench/p2p then; rows measured
before 2026-12-05 05:51 lack it), ``steps_cpu_ms`` / ``steps_busy`` (JSON only, both runs: the
machine's CPU a step and the cores busy during rank 0's steps alone, :mod:`bench.cpu_window`;
rows since 2026-12-05 14:06), ``avg_s`` (JSON only: the part of ``time_to_target_s`` spent
averaging the peers' models, gossip's one all-reduce; 0 for the others; rows since 2026-12-05
23:00). A ``bsp_shared`` row's step is its
superstep (one exchange between the agents, one update; steps = supersteps), its bytes and
communication per agent: its workers' own steps are gradients, as fast as the CPU allows.

Targets (4 hosts, 10 Mbit/s, CNN, time to 0.95): the best Tandem row >= 10x faster than plain DDP,
>= 2.5x faster than DDP + PowerSGD hook, and <= 1.3x the compute-only time (local step time x the
best row's steps to target); every row's emulation error <= 20 %; METHODS M3 on the real links:
the candidate PS with 4x the steps (``param_server-long``) reaches 0.95 sooner than sync PS,
the two measured side by side. Rows on another optimizer than the recipe's (``sgd_opts``) are
never the best row. The compute-only ratio is also
reported at every other rate measured: ``--rates unshaped`` runs the rows on the same namespaces
with no ``tbf`` at all, which tells a bound of the links from one of the machine (4 hosts on its
cores). Without root every target is
NOT RUN. ``--quick`` (no emulated twin for the DDP rows) writes ``cluster_quick.json``, so the
full results the docs render from stay. ``--pin`` (at most one host per core) gives each host a
core of its own, in the real run and in its twin (:mod:`bench.pinning`), and writes
``cluster_<N>hosts_pinned.json``: the same targets, for hosts that do not share cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from bench.cluster_run import (
    comm_s,
    cpu_ms_per_step,
    first_error,
    measured_collective,
    measured_duplex,
    rows_for,
    run_emulated,
    run_real,
    step_s,
    units,
)
from bench.cluster_targets import TARGET, rescore, targets
from bench.harness import Bench
from bench.netns import Cluster, NetnsUnavailable, unavailable_reason
from bench.pinning import usable_cores

WORKLOADS: dict[str, dict[str, Any]] = {
    "cnn": {"workload": {"name": "mnist5k", "options": {"hidden": 360}}, "batch_size": 32,
            "lr": 0.05, "momentum": 0.9, "eval_every": 10, "target_accuracy": TARGET},
    "textlm": {"workload": {"name": "textlm"}},  # its own recipe: AdamW 3e-3, batch 16, clip 1
}
FULL_STEPS = {"cnn": 200, "textlm": 20}
QUICK_STEPS = {"cnn": 160, "textlm": 10}
COLUMNS = ["rate", "workload", "system", "status", "steps", "step_ms", "emu_step_ms", "emu_err",
           "comm_ms", "emu_comm_ms", "steps_to_target", "time_to_target_s", "final", "bytes/step",
           "wire/step", "drops", "vs_ddp"]
PORT = 29500
UNSHAPED = "unshaped"  # a --rates value: the namespaces' veth pairs with no tbf


#: make bench's rows: the references, all-reduce with the main codecs, and the full run's best
#: rows (gossip, top-k 0.1 %, float16 average, mixing every step and every 4th), so that the
#: quick run checks the headline targets too
QUICK_ROWS = ("local", "ddp", "ddp-powersgd", "topk", "powersgd", "powersgd-r1",
              "gossip-topk0.001-avg16", "gossip-topk0.001-avg16-mix4")


# ---- the benchmark -------------------------------------------------------------------------
def link_latency(net: Cluster) -> float:
    """Half the smallest round trip from host 0 to host 1 (s): the emulator's latency."""
    return net.rtt_s(0, 1) / 2


def limit_for(cfg: dict[str, Any], params: int, rate_bps: float) -> float:
    """A generous wall limit for one run: the time of eight dense models through one link per
    step (a server's downlink takes one from every worker), plus start-up."""
    return 300 + int(cfg["steps"]) * max(1.0, 8 * params * 4 * 8 / rate_bps)


def measure(args: argparse.Namespace, bench: Bench,
            found: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Run every chosen row into ``found`` (filled as rows finish, so that an interrupted run
    still reports what it measured)."""
    from bench.netns import parse_rate_bps
    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload
    from tandem.workloads.models import count_parameters

    root = Path(args.runs)
    shutil.rmtree(root, ignore_errors=True)
    only = {s for s in args.only.split(",") if s}
    port = PORT
    for rate in args.rates:
        shaped = rate != UNSHAPED
        with Cluster(args.hosts, rate if shaped else None) as net:
            latency = link_latency(net)
            net_spec = f"{rate}:{round(latency * 1e6)}us,hosts={args.hosts}"
            if shaped:
                duplex, source = measured_duplex(rate, args.hosts)
                collective, coll_source = measured_collective(rate, args.hosts)
                # the penalty needs a queue, which the token bucket's burst does not make
                burst_us = net.burst / (parse_rate_bps(rate) / 8) * 1e6
                net_spec += (f",duplex={duplex},duplex_after={burst_us:.0f}us"
                             + (f",collective={collective}" if collective > 1.0 else "")
                             + f",burst={net.burst}b")  # the testbed's token buckets
                bench.note(f"{rate}: tbf rate {rate} burst {net.burst} B latency "
                           f"{net.queue_latency} on both ends of each host's link; emulated "
                           f"twin net={net_spec!r} (latency = half the smallest 1-byte TCP "
                           f"round trip; {args.hosts} emulated hosts: the processes of one "
                           f"share its link, as on the namespaces; duplex = {source}; "
                           f"collective = {coll_source}; both after the token bucket's burst, "
                           f"which the twin's link lets through at once as tbf does: burst)")
            else:
                bench.note(f"{rate}: tbf rate none: the same namespaces and veth pairs, not "
                           f"rate-limited (what the machine allows {args.hosts} hosts); no "
                           "emulated twin (the emulator is not involved)")
            for wl in args.workloads:
                steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)[wl]
                base = dict(WORKLOADS[wl], workers=args.hosts, steps=steps, seed=0,
                            progress=False, timeout_s=300.0)
                if wl == "textlm":
                    base["eval_every"] = steps
                work = build_workload(WorkloadConfig(**base["workload"]), 0)
                params = count_parameters(work.model_fn())
                found[(rate, wl)] = {"params": params, "rows": {},
                                     "emu_net": net_spec if shaped else None}
                for row in rows_for(args.hosts, wl):
                    if only and row.key not in only:
                        continue
                    if row.kind == "local" and rate != args.rates[0]:
                        share_local(found, args.rates[0], rate, wl)
                        continue
                    cfg = dict(base, strategy={"name": row.strategy,
                                               "options": row.strategy_opts},
                               codec={"name": row.codec, "options": row.codec_opts})
                    if row.workers is not None:
                        cfg["workers"] = row.workers
                    if row.sgd_opts:
                        cfg["optimizer"] = {"name": "sgd", "options": row.sgd_opts}
                    cfg["steps"] = steps * row.steps_factor
                    row_dir = root / rate / wl / row.key
                    row_dir.mkdir(parents=True, exist_ok=True)
                    limit = limit_for(cfg, params, parse_rate_bps(rate if shaped else "1gbit"))
                    print(f"[cluster] {rate} {wl} {row.system}: real links", flush=True)
                    port += 1
                    try:
                        real = run_real(net, row, cfg, row_dir, port, limit, pin=args.pin)
                    except Exception as err:  # noqa: BLE001 - reported as FAILED
                        real = {"error": first_error(f"{type(err).__name__}: {err}")}
                    emu = None
                    if row.kind != "local" and "error" not in real and shaped and \
                            not (args.quick and row.kind == "ddp"):
                        print(f"[cluster] {rate} {wl} {row.system}: emulated {net_spec}",
                              flush=True)
                        emu = run_emulated(row, cfg, row_dir, net_spec, limit,
                                           pin_hosts=args.hosts if args.pin else None)
                    found[(rate, wl)]["rows"][row.key] = (row, real, emu)
                    print(f"[cluster] {rate} {wl} {row.system}: real {_ms(step_s(real))} ms/step"
                          f", emulated {_ms(step_s(emu))} ms/step, "
                          f"{real.get('error') or (emu or {}).get('error') or 'ok'}", flush=True)


def share_local(found: dict[tuple[str, str], dict[str, Any]], first: str, rate: str,
                wl: str) -> None:
    """The compute-only row sends nothing, so it runs once per workload (at the first rate)
    and is reported at every rate of the run: a merge then replaces every rate's old one."""
    row = found.get((first, wl), {}).get("rows", {}).get("local")
    if row is not None:
        found[(rate, wl)]["rows"]["local"] = row


def report(bench: Bench, found: dict[tuple[str, str], dict[str, Any]], hosts: int) -> None:
    for (rate, wl), got in found.items():
        rows = got["rows"]
        ddp = step_s(rows["ddp"][1]) if "ddp" in rows else None
        local = None
        for (_rate, w2), g2 in found.items():
            if w2 == wl and "local" in g2["rows"]:
                local = step_s(g2["rows"]["local"][1])
        got["local_step_s"] = local
        for row, real, emu in rows.values():
            s = (real or {}).get("summary") or {}
            rs, em = step_s(real), step_s(emu)
            if "error" in (real or {}):
                status = f"FAILED: {real['error']}"
            elif emu is not None and "error" in emu:
                status = f"emulated run FAILED: {emu['error']}"
            else:
                status = "ok"
            final = s.get("final_test_accuracy")
            u = units(s)
            steps = u.steps
            bench.row(rate=rate, workload=wl, system=row.system, status=status, steps=steps,
                      step_ms=_ms(rs), emu_step_ms=_ms(em),
                      emu_err=abs(em - rs) / rs if rs and em else None,
                      comm_ms=_ms(comm_s(real, row)), emu_comm_ms=_ms(comm_s(emu, row)),
                      steps_to_target=s.get("steps_to_target"),
                      time_to_target_s=s.get("time_to_target_s"),
                      avg_s=s.get("averaging_to_target_s"), final=final,
                      **{"bytes/step": u.bytes_per_step,
                         "wire/step": (real["tx_bytes"] / hosts / steps
                                       if steps and row.kind != "local" and "tx_bytes" in real
                                       else None)},
                      drops=(real or {}).get("drops") if row.kind != "local" else None,
                      vs_ddp=ddp / rs if ddp and rs else None,
                      emu_net=got.get("emu_net") if emu is not None else None,
                      **cpu_columns(real, emu, steps))


def cpu_columns(real: dict[str, Any] | None, emu: dict[str, Any] | None,
                steps: int | None) -> dict[str, float | None]:
    """Machine-wide CPU of the real and the emulated run (JSON only, not rendered): per step
    over the whole run (start-up included: ``cpu_ms``, ``softirq_ms``), and over rank 0's
    steps alone (:mod:`bench.cpu_window`: ``steps_cpu_ms`` per step, ``steps_busy`` the cores
    busy then). Where the two differ in time but not in what the emulator models, the CPU the
    real hosts spend (the kernel's packet work on the namespaces: ``softirq``) is a candidate."""
    r, e = cpu_ms_per_step(real, steps), cpu_ms_per_step(emu, steps)
    rs, es = (real or {}).get("steps_cpu") or {}, (emu or {}).get("steps_cpu") or {}
    return {"cpu_ms": r["cpu"], "emu_cpu_ms": e["cpu"], "softirq_ms": r["softirq"],
            "emu_softirq_ms": e["softirq"], "steps_cpu_ms": _round(rs.get("ms_per_step")),
            "emu_steps_cpu_ms": _round(es.get("ms_per_step")), "steps_busy": _round(rs.get("busy")),
            "emu_steps_busy": _round(es.get("busy"))}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def result_name(hosts: int, pin: bool, quick: bool) -> str:
    """``cluster`` (4 hosts sharing the cores: the issue's setting and the docs' main tables),
    else ``cluster_<hosts>hosts[_pinned]``; ``--quick`` adds ``_quick``."""
    name = "cluster" if hosts == 4 and not pin else f"cluster_{hosts}hosts" + "_pinned" * pin
    return name + "_quick" * quick


def _ms(s: float | None) -> float | None:
    return None if s is None else round(1e3 * s, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10mbit, cnn, rows "
                    + ", ".join(QUICK_ROWS) + f", {QUICK_STEPS['cnn']} steps, no emulated twin "
                    "for the DDP rows")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--pin", action="store_true", help="run host i's processes on the i-th "
                    "core this process may use, alone (taskset; needs --hosts <= those cores): "
                    "hosts with a core each, as separate machines have; the emulated twin's "
                    "rank r on the (r %% hosts)-th")
    ap.add_argument("--rates", default="10mbit,100mbit", help="tbf rates; 'unshaped': the same "
                    "namespaces without tbf (no emulated twin), to see what the machine allows")
    ap.add_argument("--workloads", default="cnn,textlm")
    ap.add_argument("--only", default="", help="comma-separated row keys: "
                    + ", ".join(r.key for r in rows_for(4, "cnn")))
    ap.add_argument("--runs", default="runs/bench-cluster", help="where run records go")
    ap.add_argument("--steps", type=int, default=0, help="steps of every run (trials; default "
                    f"{FULL_STEPS}, --quick {QUICK_STEPS})")
    ap.add_argument("--results", default="", help="directory for the JSON (default "
                    "bench/results; give another one for trial runs)")
    ap.add_argument("--merge", action="store_true", help="keep the existing results' rows "
                    "(rate, workload, system) and targets that this run does not measure")
    ap.add_argument("--rescore", action="store_true", help="measure nothing: recompute the "
                    "targets and the best row from the existing results' rows, keeping their "
                    "provenance (needs no root)")
    args = ap.parse_args()
    if args.only and not (args.merge or args.quick or args.results or args.rescore):
        ap.error("--only measures part of the table: add --merge to keep the file's other "
                 "rows, or --results DIR for a trial (else the file holds these rows alone)")
    if args.results:
        import bench.harness

        bench.harness.RESULTS = Path(args.results)
    if args.quick:
        args.rates, args.workloads = "10mbit", "cnn"
        args.only = args.only or ",".join(QUICK_ROWS)
    args.rates = [r for r in args.rates.split(",") if r]
    args.workloads = [w for w in args.workloads.split(",") if w]
    if args.pin and args.hosts > len(usable_cores()):
        ap.error(f"--pin gives each host a core of its own: --hosts {args.hosts} needs "
                 f"{args.hosts} cores, this process may use {len(usable_cores())}")
    bench = Bench(result_name(args.hosts, args.pin, args.quick), COLUMNS)
    if args.rescore:
        rescore(bench, args.hosts)
        return
    why = unavailable_reason()
    found: dict[tuple[str, str], dict[str, Any]] = {}
    if why is None:
        try:
            measure(args, bench, found)
        except NetnsUnavailable as err:
            why = str(err)
        except KeyboardInterrupt:
            bench.note("interrupted: only the rows above were measured")
    if args.merge:
        now = {(rate, wl, row.system) for (rate, wl), got in found.items()
               for row, _, _ in got["rows"].values()}
        rates = {rate for rate, _ in found}
        bench.keep_previous(lambda r: (r.get("rate"), r.get("workload"), r.get("system"))
                            not in now, lambda t: True,
                            ", ".join(f"{r} {w} {s}" for r, w, s in sorted(now)) or "nothing",
                            keep_note=lambda n: n.partition(":")[0] not in rates
                            and n.partition(":")[2].startswith(" tbf rate"))
    if why is None:
        report(bench, found, args.hosts)
    else:
        bench.note(f"real links not built: {why}")
    targets(bench, args.hosts, why, args.quick)
    bench.note(f"{args.hosts} hosts; cnn = mnist5k hidden=360 (201,538 parameters), batch 32 "
               f"per host, SGD lr 0.05 momentum 0.9, eval every 10 steps, target {TARGET}; "
               "textlm = default size (867,072 parameters), its own recipe, time per step only; "
               "DDP + powersgd uses torch's PowerSGDState(matrix_approximation_rank=2, "
               "start_powerSGD_iter=2); the emulated DDP rows route DDP's buckets through "
               "Tandem's codec hook (dense, fp16, powersgd r2) since torch's hooks bypass the "
               "emulator; step times are training wall / steps with evaluation excluded")
    bench.finish()


if __name__ == "__main__":
    main()
