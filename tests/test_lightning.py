"""A LightningModule trains through Lightning's own Trainer and DDP strategy with a Tandem codec as
the comm hook: 2 CPU processes over gloo, started by Lightning from ``examples/lightning_codec.py``.

Each run is the example as a user runs it (a subprocess from a fresh directory); the runs are
shared by the tests of this module (3 in all, ~10 s each on an idle 2-core machine).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="Lightning is not installed: pip install -e '.[lightning]'")

from tandem.codecs import make_codec  # noqa: E402
from tandem.transport import costs  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lightning_codec.py"
STEPS, WORLD = 20, 2
SHAPES = [(64, 64), (64,), (10, 64), (10,)]  # the example's MLP
ROW = re.compile(r"rank (\d): (\d+) steps, loss ([\d.]+) -> ([\d.]+), test accuracy ([\d.]+), "
                 r"(\d+) bytes sent \([\d,]+ per step\), logged ([^,\s]+), parameters (\w+)")
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK",
             "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc; children first found, then theirs)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def run_launched(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a command that starts its own worker processes; on a timeout or any error, kill the
    command, every descendant (even those in new sessions) and its process group, then reap it."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(TMPDIR=str(cwd), OMP_NUM_THREADS="1", HF_HOME=str(cwd / "hf"))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """``run(codec, *codec_opts)`` -> (rows by rank, rank 0's final parameters, the log dir);
    each distinct run happens once per module."""
    done: dict[tuple[str, ...], tuple] = {}

    def run(codec: str, *opts: str) -> tuple[dict[int, tuple], dict[str, torch.Tensor], Path]:
        key = (codec, *opts)
        if key not in done:
            where = tmp_path_factory.mktemp(f"lightning-{codec}")
            args = [sys.executable, str(EXAMPLE), "--codec", codec, "--steps", str(STEPS),
                    "--workers", str(WORLD), "--out", "logs", "--save", "params.pt"]
            for opt in opts:
                args += ["--codec-opt", opt]
            result = run_launched(args, where, timeout=240)
            assert result.returncode == 0, result.stderr[-4000:]
            rows = {int(m[0]): m[1:] for m in ROW.findall(result.stdout)}
            assert sorted(rows) == list(range(WORLD)), result.stdout + result.stderr[-3000:]
            done[key] = (rows, torch.load(where / "params.pt"), where / "logs")
        return done[key]

    return run


def message_bytes(name: str, options: dict) -> int:
    """The exact size of one code of the example's model from a fresh codec."""
    return make_codec(name, options, seed=0).encode([torch.randn(s) for s in SHAPES]).nbytes


def test_trainer_sends_every_gradient_through_the_codec_and_logs_its_bytes(lightning_run):
    """Breaks if Lightning drops the hook (it ignores ``ddp_comm_hook`` on CPU), if a step skips
    the codec, if the logged bytes are not the meter's, or if the ranks' models diverge."""
    rows, params, logs = lightning_run("topk", "ratio=0.1")
    _, plain, _ = lightning_run("none")
    per_step = costs.all_gather(message_bytes("topk", {"ratio": 0.1}), WORLD).sent
    assert per_step == 8 * (410 + 7 + 64 + 1)  # value + int32 position, ceil(0.1 n) per layer
    for steps, first, last, acc, sent, logged, digest in rows.values():
        assert int(steps) == STEPS
        assert int(sent) == per_step * STEPS and logged == sent
        assert float(last) < float(first) and float(acc) > 0.3  # chance is 0.1
        assert digest == rows[0][-1]  # the ranks applied the same mean gradient
    with open(logs / "metrics.csv") as f:
        series = [float(r["tandem/bytes_sent"]) for r in csv.DictReader(f)
                  if r.get("tandem/bytes_sent")]
    assert series == [per_step * (i + 1) for i in range(STEPS)]
    moved = max(float((params[k] - plain[k]).abs().max()) for k in plain)
    assert moved > 1e-3  # top-k's updates are not DDP's own all-reduce


def test_dense_codec_gives_the_plain_trainers_parameters(lightning_run):
    """The dense codec is DDP's mean: the same final parameters as Lightning without a hook;
    its meter counts one fp32 all-reduce of the whole model per step, the plain run nothing."""
    rows, params, _ = lightning_run("dense")
    plain_rows, plain, _ = lightning_run("none")
    per_step = costs.all_reduce(message_bytes("dense", {}), WORLD).sent
    assert per_step == 4 * sum(torch.Size(s).numel() for s in SHAPES)
    assert all(int(r[4]) == per_step * STEPS and r[5] == r[4] for r in rows.values())
    assert all(int(r[4]) == 0 and r[5] == "-" for r in plain_rows.values())
    assert plain.keys() == params.keys()
    for k in plain:
        torch.testing.assert_close(params[k], plain[k], rtol=0, atol=1e-6)
    assert rows[0][-1] == rows[1][-1]
