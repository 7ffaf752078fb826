"""Emulated links versus a real rate-limited link between two network namespaces.

Run as root (``sudo make bench`` or CI): it creates two namespaces joined by a veth pair, limits
each end with ``tc qdisc ... tbf`` (this kernel has no netem, so the real link has no added
latency and the emulation is run with 0 latency too), runs a 2-rank gloo job across them and the
same job on loopback with the emulator, and prints predicted versus measured time per size.
Without root it measures the emulator only. Namespaces are deleted at the end, also on failure.

    python -m bench.links [--rate 200mbit]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import Bench
from tandem.config import NetConfig
from tandem.transport import costs

# Sizes well above tbf's 128 kB burst, which lets a small transfer through at line rate.
SIZES = [1_000_000, 4_000_000, 16_000_000, 32_000_000]
NS = ("tandemA", "tandemB")
ADDR = ("10.213.7.1", "10.213.7.2")


def measure(net: str | None, sizes: list[int], reps: int = 3) -> list[dict]:
    """Inside a rank: the fastest of ``reps`` all-reduce and send round-trip times per size
    (machine load only ever adds delay, so the fastest rep is the cleanest measurement)."""
    from tandem.transport.env import transport_from_env
    from tandem.transport.probe import time_operations

    t = transport_from_env(net=NetConfig.parse(net) if net else None, timeout_s=120)
    rows = [{"bytes": r["bytes"], "all_reduce_s": min(r["all_reduce_s"]),
             "send_s": min(r["send_s"])} for r in time_operations(t, sizes, reps)]
    t.close()
    return rows


def _sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True)


def _setup(rate: str) -> None:
    _teardown()
    _sh(f"ip netns add {NS[0]} && ip netns add {NS[1]}")
    _sh(f"ip link add vtA type veth peer name vtB && ip link set vtA netns {NS[0]} "
        f"&& ip link set vtB netns {NS[1]}")
    for ns, dev, addr in ((NS[0], "vtA", ADDR[0]), (NS[1], "vtB", ADDR[1])):
        _sh(f"ip netns exec {ns} ip addr add {addr}/30 dev {dev}")
        _sh(f"ip netns exec {ns} ip link set {dev} up && ip netns exec {ns} ip link set lo up")
        _sh(f"ip netns exec {ns} tc qdisc replace dev {dev} root tbf rate {rate} "
            "burst 128kb latency 50ms")


def _teardown() -> None:
    for ns in NS:
        subprocess.run(f"ip netns del {ns}", shell=True, capture_output=True)


def run_real(rate: str, sizes: list[int]) -> list[dict]:
    """Two ranks in two namespaces over the shaped veth pair."""
    _setup(rate)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            procs = []
            for rank, (ns, dev) in enumerate(((NS[0], "vtA"), (NS[1], "vtB"))):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR=ADDR[0],
                           MASTER_PORT="29611", GLOO_SOCKET_IFNAME=dev, LOCAL_RANK="0")
                env.pop("TANDEM_STORE_HOSTED", None)
                out = Path(tmp) / f"r{rank}.json"
                code = ("import json,sys; from bench.links import measure; "
                        f"json.dump(measure(None, {sizes!r}), open({str(out)!r}, 'w'))")
                procs.append((subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                                code], env=env, cwd=Path(__file__).parent.parent),
                              out))
            for p, _ in procs:
                try:
                    p.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    p.kill()
            return json.loads(procs[0][1].read_text())
    finally:
        _teardown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="200mbit")
    args = ap.parse_args()
    from tandem.launch import spawn

    net = NetConfig.parse(f"{args.rate}:0ms")
    emulated = spawn(measure, 2, f"{args.rate}:0ms", SIZES, timeout_s=600)[0]
    real = None
    if os.geteuid() == 0 and subprocess.run("command -v ip tc", shell=True,
                                            capture_output=True).returncode == 0:
        try:
            real = run_real(args.rate, SIZES)
        except (subprocess.CalledProcessError, OSError, json.JSONDecodeError) as err:
            print(f"real link unavailable: {err}")
    b = Bench("links", ["bytes", "op", "model_s", "emulated_s", "real_s", "emulated/model",
                        "real/model"])
    worst_emu, worst_real = 0.0, 0.0
    for i, n in enumerate(SIZES):
        model_ar = costs.all_reduce(n, 2).seconds(net.bytes_per_s, 0.0)
        model_p2p = (n + 4) / net.bytes_per_s
        ops = (("all_reduce", model_ar, "all_reduce_s"), ("send", model_p2p, "send_s"))
        for op, model, key in ops:
            emu = emulated[i][key]
            rl = real[i][key] if real else None
            b.row(bytes=n, op=op, model_s=model, emulated_s=emu, real_s=rl,
                  **{"emulated/model": emu / model, "real/model": (rl / model) if rl else None})
            worst_emu = max(worst_emu, abs(emu / model - 1))
            if rl:
                worst_real = max(worst_real, abs(rl / model - 1))
    b.target("emulator max relative error vs model", worst_emu, "<= 0.25")
    if real:
        b.target("real tbf link max relative error vs model", worst_real, "<= 0.35")
    else:
        b.note("not root or no iproute2: real-link rows skipped")
    b.finish()


if __name__ == "__main__":
    main()
