"""The examples run as a user runs them (a subprocess from a fresh directory) and still learn."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, text=True,
                          capture_output=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_ddp_hook_example_trains_through_a_compressing_codec(tmp_path: Path) -> None:
    """Breaks if the plain-DDP loop with a Tandem hook stops learning, stops compressing, or
    loses a rank's report."""
    out = run_example("ddp_hook.py", "--codec", "topk", "--codec-opt", "ratio=0.1",
                      "--steps", "40", cwd=tmp_path)
    rows = re.findall(r"rank (\d): .*loss ([\d.]+) -> ([\d.]+), test accuracy ([\d.]+), "
                      r"([\d,]+) bytes sent per step", out)
    assert sorted(int(r[0]) for r in rows) == [0, 1], out
    dense_bytes = 4 * (64 * 128 + 128 + 128 * 10 + 10)  # the digits MLP, fp32
    for _, first, last, acc, sent in rows:
        assert float(last) < float(first) / 4 and float(acc) > 0.9, out
        assert 0 < int(sent.replace(",", "")) < 0.3 * dense_bytes, out


def test_own_model_example_trains_a_custom_model(tmp_path: Path) -> None:
    """Breaks if a user's own model and dataset no longer train through ``tandem.train``."""
    out = run_example("own_model.py", "--steps", "100", cwd=tmp_path)
    acc = float(re.search(r"test accuracy ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert acc > 0.9, out
    assert (tmp_path / "runs" / "rings-allreduce-dense" / "summary.json").is_file()


def test_own_training_job_example_runs_its_recipe_and_returns_the_model(tmp_path: Path) -> None:
    """Breaks if a job with its own optimizer factory, schedule, clipping, accumulation, metric,
    callback and a transform-per-epoch Dataset no longer trains, or model.pt stops loading."""
    out = run_example("own_training_job.py", "--workers", "2", "--steps", "60",
                      "--out", str(tmp_path / "job"), cwd=tmp_path)
    acc = float(re.search(r"final test accuracy ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert acc > 0.6, out
    assert "top-2" in out and "Sequential with 66410 parameters" in out
    assert out.count("step 60: test accuracy") == 1  # the callback prints on rank 0 only
