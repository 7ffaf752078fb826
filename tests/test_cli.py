"""The command line: a real `tandem train` run, clear errors for bad flags, listings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "tandem"


def _tandem(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_train_writes_a_run_record(tmp_path):
    out = tmp_path / "cli-run"
    r = _tandem("train", "--workers", "2", "--steps", "15", "--lr", "0.2", "--no-progress",
                "--net", "1gbit:100us", "--slow-worker", "1:2", "--tensorboard", "--out", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 15
    assert "final_test_accuracy" in r.stdout
    assert list((out / "tb").glob("events.out.tfevents.*")), "TensorBoard scalars missing"
    # the comparison report reads run records: a table naming both runs, and one PNG
    png = tmp_path / "cmp.png"
    r = _tandem("report", str(out), str(out), "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("cli-run") >= 2 and png.read_bytes()[:4] == b"\x89PNG"
    r = _tandem("report", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "summary" in r.stderr


def test_bad_flag_values_exit_2_with_the_field_named(tmp_path):
    r = _tandem("train", "--workers", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "workers" in r.stderr and "Traceback" not in r.stderr
    r = _tandem("train", "--codec", "zip", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "dense" in r.stderr  # the choices are listed
    r = _tandem("train", "--net", "fast", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "net" in r.stderr


def test_help_documents_every_option_and_lists_work():
    r = _tandem("train", "--help")
    for flag in ("--config", "--strategy", "--codec", "--workers", "--workload", "--steps",
                 "--epochs", "--batch-size", "--lr", "--seed", "--net", "--stragglers",
                 "--target-accuracy", "--out", "--tensorboard", "--slow-worker"):
        assert flag in r.stdout, flag
    assert "dense" in _tandem("codecs").stdout
    listing = _tandem("strategies").stdout
    assert "allreduce" in listing and "codecs: dense only (one process" in listing
