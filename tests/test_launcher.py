"""The launcher reaps every child: on success, on a worker's error, and on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jobs
from conftest import child_pids
from tandem.errors import TandemError, WorkerFailed
from tandem.launch import spawn


def test_error_in_one_worker_is_reported_with_its_rank_and_text():
    with pytest.raises(WorkerFailed) as info:
        spawn(jobs.raise_on_rank, 3, 1, timeout_s=60)
    assert info.value.ranks[0] == 1 or 1 in info.value.ranks
    assert "boom on rank 1" in str(info.value)


def test_every_worker_leads_a_session_of_its_own():
    """Linux's autogroup scheduler shares the CPU between sessions: a worker in the launcher's
    session got less of it than a host of its own would (tandem.launch_child._own_session)."""
    out = spawn(jobs.session_of, 3, timeout_s=60)
    assert all(sid == pid for pid, sid in out), out
    assert len({sid for _, sid in out}) == 3
    assert os.getsid(0) not in {sid for _, sid in out}


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec: give the launcher a terminal's default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_ctrl_c_and_sigterm_reap_all_workers(tmp_path, sig, group):
    """Ctrl-C (SIGINT to the whole process group) or SIGTERM to the launcher alone: every
    worker is gone afterwards."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "tandem"), "train", "--workers", "3", "--steps",
         "100000", "--no-progress", "--out", str(tmp_path / "r")],
        # stderr to a file, not a pipe nobody reads: a full pipe would block the writers
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "wb"),
        start_new_session=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while len(child_pids(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
        kids = child_pids(proc.pid)
        assert len(kids) >= 3, "workers did not start"
        time.sleep(3)
        if group:
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does
        else:
            os.kill(proc.pid, sig)  # what a scheduler's kill does
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{sig.name} did not end the launcher within 30 s: "
                        + _diagnose(proc.pid, tmp_path))
        for k in kids:
            assert not Path(f"/proc/{k}").exists() or \
                Path(f"/proc/{k}/stat").read_text().split()[2] == "Z", f"worker {k} left running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _diagnose(pid: int, tmp_path: Path) -> str:
    """What each process of the tree is blocked in, and what the launcher printed."""
    lines = []
    for p in [pid, *child_pids(pid)]:
        try:
            stat = Path(f"/proc/{p}/stat").read_text().split()
            wchan = Path(f"/proc/{p}/wchan").read_text()
            lines.append(f"pid {p} state {stat[2]} wchan {wchan}")
        except OSError:
            lines.append(f"pid {p} gone")
    err = (tmp_path / "stderr.txt").read_text(errors="replace")[-3000:]
    return "; ".join(lines) + "\nstderr:\n" + err


def test_children_keep_large_buffers_in_the_heap(monkeypatch):
    """Breaks if the launcher stops tuning its children's allocator (large per-step buffers
    would be page-faulted again every step, see tandem.allocator) or ignores TANDEM_MALLOC=0."""
    assert spawn(jobs.allocator_state, 2, timeout_s=60) == [(True, True), (True, True)]
    monkeypatch.setenv("TANDEM_MALLOC", "0")
    assert spawn(jobs.allocator_state, 1, timeout_s=60) == [(False, False)]


def test_workers_come_from_the_fork_server_with_the_launchers_environment(monkeypatch):
    """Default: workers are forked from one server (not children of the launcher) that is reused
    across launches, and each still sees the launcher's environment as of its own launch (the
    server's was fixed when it started). TANDEM_START_METHOD=spawn: the launcher's children;
    an unknown method is refused by name."""
    first = spawn(jobs.started_from, 2, timeout_s=60)
    monkeypatch.setenv("TANDEM_TEST_MARK", "after")
    second = spawn(jobs.started_from, 2, timeout_s=60)
    server = first[0][0]
    assert server != os.getpid() and {p for p, _ in first + second} == {server}
    assert [m for _, m in second] == ["after", "after"]
    monkeypatch.setenv("TANDEM_START_METHOD", "spawn")
    assert spawn(jobs.started_from, 1, timeout_s=120) == [(os.getpid(), "after")]
    monkeypatch.setenv("TANDEM_START_METHOD", "fork")
    with pytest.raises(TandemError, match="TANDEM_START_METHOD='fork'"):
        spawn(jobs.started_from, 1, timeout_s=60)


def test_a_worker_stuck_outside_any_wait_is_ended_and_named_after_the_grace():
    """Rank 1 hangs; rank 0's wait times out naming it. The job is lost at that point: the
    launcher gives rank 1 ``failure_grace_s`` and then ends it, reporting it as the cause with
    rank 0's error, instead of waiting for the job's deadline (24 h under ``tandem train``)."""
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        spawn(jobs.stuck_peer, 2, 2.0, timeout_s=300, failure_grace_s=3)
    took = time.monotonic() - t0
    assert took < 60, f"the launcher waited {took:.0f}s for a stuck worker"
    assert info.value.ranks == [0, 1]
    message = str(info.value)
    assert message.startswith("rank 1 failed: worker 1 still running 3s after rank 0 failed")
    assert "PeerTimeout" in message and "rank(s) [1] did not answer" in info.value.details[0]


def test_a_fork_server_stuck_in_its_imports_fails_the_launch_by_name(tmp_path):
    """A fork server that never finishes importing its preloads would block ``Process.start``
    for good: at the start deadline the launcher kills it and fails naming it; the next launch
    in the same process starts a fresh server. Run in a fresh interpreter, so the server is
    this test's own."""
    (tmp_path / "stuck_preload.py").write_text("import time\ntime.sleep(3600)\n")
    script = (
        "import time, tandem.launch as L, jobs\n"
        "from tandem.errors import WorkerFailed\n"
        "L._PRELOAD.append('stuck_preload')\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    L.spawn(jobs.started_from, 2, timeout_s=120, start_timeout_s=3)\n"
        "except WorkerFailed as err:\n"
        "    print('FAILED', round(time.monotonic() - t0), err.ranks, err)\n"
        "L._PRELOAD.remove('stuck_preload')\n"
        "print('AGAIN', len(L.spawn(jobs.started_from, 2, timeout_s=120)))\n")
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), tests]))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    failed = next(line for line in run.stdout.splitlines() if line.startswith("FAILED"))
    assert int(failed.split()[1]) < 30
    assert "[0, 1]" in failed and "fork server" in failed and "never answered" in failed
    assert "AGAIN 2" in run.stdout
    left = subprocess.run(["pgrep", "-f", "stuck_preload"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the stuck fork server was left running"


def test_start_timeout_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("TANDEM_START_TIMEOUT_S", "soon")
    with pytest.raises(TandemError, match="TANDEM_START_TIMEOUT_S='soon'"):
        spawn(jobs.started_from, 1, timeout_s=60)


def test_a_killed_fork_server_is_replaced_at_the_next_launch():
    """A long-lived launching process (a notebook) whose fork server was killed (OOM killer,
    a stray kill) still launches: the next start brings up a new server."""
    first = spawn(jobs.started_from, 1, timeout_s=60)[0][0]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # gone, or a zombie until the next start reaps it
        try:
            if Path(f"/proc/{first}/stat").read_text().split()[2] == "Z":
                break
        except OSError:
            break
        time.sleep(0.1)
    second = spawn(jobs.started_from, 2, timeout_s=120)
    assert {p for p, _ in second} != {first} and len({p for p, _ in second}) == 1


STUCK_THREAD = """
import threading, sys
from tandem.launch_child import exit_without_teardown
threading.Thread(target=threading.Event().wait, name="stuck-in-a-wait").start()  # never ends
print("the summary")  # piped: block-buffered, so only a flush brings it out
print("a warning", file=sys.stderr)
exit_without_teardown(3)
"""


def test_a_worker_ends_with_its_code_and_output_while_a_thread_is_stuck_in_a_wait():
    """Both entries (the launcher's children, ``tandem worker`` under torchrun) end with
    ``exit_without_teardown``: a thread left in a wait no peer will answer would otherwise hold
    the interpreter's exit forever (Python joins non-daemon threads), and the C++ teardown of a
    process group nobody destroyed once aborted a finished gossip worker under torchrun."""
    r = subprocess.run([sys.executable, "-c", STUCK_THREAD], capture_output=True, text=True,
                       timeout=120)  # without the helper: a hang, then TimeoutExpired
    assert r.returncode == 3
    assert r.stdout == "the summary\n"
    assert r.stderr == "a warning\n"


def test_tandem_worker_reports_a_bad_config_as_bad_input(tmp_path):
    """``tandem worker`` ends through the same exit: a TandemError is one red line and status 2,
    as in every other command."""
    bad = tmp_path / "job.yaml"
    bad.write_text("workers: -1\n")
    r = subprocess.run([sys.executable, "-m", "tandem.cli", "worker", "--config", str(bad)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and "workers" in r.stderr
    assert "Traceback" not in r.stderr


WORKER_RAISING = """
import sys
import tandem.worker
from tandem.cli import app
code = {"none": None, "int": 4, "text": "stopped: the data is gone"}[sys.argv[1]]


def stop(config):
    raise SystemExit(code)


tandem.worker.torchrun_main = stop
sys.argv = ["tandem", "worker", "--config", "job.yaml"]
app()
"""


@pytest.mark.parametrize("kind, rc, err", [("none", 0, ""), ("int", 4, ""),
                                            ("text", 1, "stopped: the data is gone\n")])
def test_tandem_worker_reads_system_exit_as_python_does(tmp_path, kind, rc, err):
    """A worker that calls ``sys.exit`` ends as Python would have ended it (None: success, an
    int: that status, text: printed, status 1), though ``tandem worker`` never lets the
    interpreter's own exit run."""
    r = subprocess.run([sys.executable, "-c", WORKER_RAISING, kind], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (rc, err), r.stderr[-2000:]


WORKER_DONE = """
import sys
from pathlib import Path
import tandem.worker
from tandem.cli import app
lost = [int(r) for r in sys.argv[1:]]
tandem.worker.torchrun_main = lambda config: ({"strategy": "gossip", "lost_ranks": lost},
                                              Path("run"))
sys.argv = ["tandem", "worker", "--config", "job.yaml"]
app()
"""


def test_tandem_worker_says_why_torchrun_waits_after_a_run_that_lost_ranks(tmp_path):
    """After a run that completed without some ranks, torchrun's surviving agents wait out
    torch's exit barrier (300 s) for the lost nodes' agents: rank 0 says so, and that nothing is
    lost by stopping it; a run that lost no rank says nothing."""
    r = subprocess.run([sys.executable, "-c", WORKER_DONE, "3"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lost_ranks: [3]" in r.stdout
    assert r.stderr.startswith("note: ranks [3] were lost") and "exit barrier" in r.stderr
    r = subprocess.run([sys.executable, "-c", WORKER_DONE], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr[-2000:]
    assert "run record" in r.stdout


def test_a_script_that_launches_outside_its_main_guard_is_refused_before_any_worker(tmp_path):
    """Each worker re-imports the launching script (forkserver/spawn): an unguarded
    ``tandem.train`` would launch again from every worker. It is refused first, naming the
    script's line, and nothing is written; the same call under the guard runs."""
    body = ("import tandem\n\n\ndef main():\n"
            "    tandem.train({'workload': {'name': 'digits'}, 'workers': 2, 'steps': 2, "
            f"'progress': False, 'out': {str(tmp_path / 'run')!r}}})\n\n\n")
    script = tmp_path / "job.py"
    script.write_text(body + "main()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 1
    assert f"{script}, line 8: this line starts Tandem's workers" in r.stderr
    assert "without reporting" not in r.stderr and r.stderr.count("Traceback") == 1
    assert not (tmp_path / "run").exists()
    script.write_text(body + "if __name__ == \"__main__\":\n    main()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").is_file()
