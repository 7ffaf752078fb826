"""An ``Accelerator``-prepared model trains with a Tandem codec as its comm hook: the example
``examples/accelerate_codec.py`` started by ``accelerate launch`` as 2 CPU processes over gloo.

``accelerate launch --cpu --num_processes 2`` starts a single process (Accelerate starts several
CPU processes only through mpirun), so the runs use ``--multi_gpu``, which starts them through
torchrun; the script's ``Accelerator(cpu=True)`` keeps them on the CPU. The runs are shared by
the tests of this module (3 in all).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate",
                    reason="Accelerate is not installed: pip install -e '.[accelerate]'")

from tandem.codecs import make_codec  # noqa: E402
from tandem.transport import costs  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "accelerate_codec.py"
STEPS, WORLD = 20, 2
SHAPES = [(64, 64), (64,), (10, 64), (10,)]  # the example's MLP
ROW = re.compile(r"rank (\d): (\d+) steps, loss ([\d.]+) -> ([\d.]+), test accuracy ([\d.]+), "
                 r"(\d+) bytes sent \([\d,]+ per step\), parameters (\w+)")
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
def accelerate_run(tmp_path_factory):
    """``run(codec, *codec_opts)`` -> (rows by rank, the main process's final parameters); each
    distinct run happens once per module. Port 0: Accelerate picks a free one."""
    done: dict[tuple[str, ...], tuple] = {}

    def run(codec: str, *opts: str) -> tuple[dict[int, tuple], dict[str, torch.Tensor]]:
        key = (codec, *opts)
        if key not in done:
            where = tmp_path_factory.mktemp(f"accelerate-{codec}")
            args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", str(WORLD), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "0", str(EXAMPLE),
                    "--codec", codec, "--steps", str(STEPS), "--save", "params.pt"]
            for opt in opts:
                args += ["--codec-opt", opt]
            result = run_launched(args, where, timeout=240)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
            rows = {int(m[0]): m[1:] for m in ROW.findall(result.stdout)}
            assert sorted(rows) == list(range(WORLD)), result.stdout + result.stderr[-3000:]
            done[key] = (rows, torch.load(where / "params.pt"))
        return done[key]

    return run


def message_bytes(name: str, options: dict) -> int:
    """The exact size of one code of the example's model from a fresh codec."""
    return make_codec(name, options, seed=0).encode([torch.randn(s) for s in SHAPES]).nbytes


def test_prepared_model_sends_every_gradient_through_the_codec(accelerate_run):
    """Breaks if the hook is not registered on the prepared model, if a step skips the codec,
    or if the ranks' models diverge."""
    rows, params = accelerate_run("topk", "ratio=0.1")
    _, plain = accelerate_run("none")
    per_step = costs.all_gather(message_bytes("topk", {"ratio": 0.1}), WORLD).sent
    assert per_step == 8 * (410 + 7 + 64 + 1)  # value + int32 position, ceil(0.1 n) per layer
    for steps, first, last, acc, sent, digest in rows.values():
        assert int(steps) == STEPS and int(sent) == per_step * STEPS
        assert float(last) < float(first) and float(acc) > 0.3  # chance is 0.1
        assert digest == rows[0][-1]  # the ranks applied the same mean gradient
    moved = max(float((params[k] - plain[k]).abs().max()) for k in plain)
    assert moved > 1e-3  # top-k's updates are not DDP's own all-reduce


def test_dense_codec_gives_the_plain_accelerate_parameters(accelerate_run):
    """The dense codec is DDP's mean: the same final parameters as Accelerate without a hook;
    its meter counts one fp32 all-reduce of the whole model per step, the plain run nothing."""
    rows, params = accelerate_run("dense")
    plain_rows, plain = accelerate_run("none")
    per_step = costs.all_reduce(message_bytes("dense", {}), WORLD).sent
    assert per_step == 4 * sum(torch.Size(s).numel() for s in SHAPES)
    assert all(int(r[4]) == per_step * STEPS for r in rows.values())
    assert all(int(r[4]) == 0 for r in plain_rows.values())
    assert plain.keys() == params.keys()
    for k in plain:
        torch.testing.assert_close(params[k], plain[k], rtol=0, atol=1e-6)
    assert rows[0][-1] == rows[1][-1]
