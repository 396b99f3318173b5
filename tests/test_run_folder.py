"""Two runs into one output folder: the lock refuses a live owner, takes over a dead or torn
one, and ``--overwrite`` replaces only what the earlier run wrote (real processes, real
``sasa train``)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from workspace import TOKENS, TRAIN, Workspace, make_workspace, run_cli, snapshot


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("run-folder"))


def test_a_dead_owners_lock_is_taken_over_and_released(ws: Workspace, capsys):
    run = ws.copy(ws.run, "dead-owner")
    lock = run / ".sasa-lock"
    for owner, age in (({"host": socket.gethostname(), "pid": _dead_pid()}, 0.0),
                       ({"host": "another-host", "pid": 1}, 10_000.0)):
        lock.write_text(json.dumps({**owner, "started": time.time() - age, "token": "old"}))
        os.utime(lock, (time.time() - age, time.time() - age))
        rc, _, err = run_cli(["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--out", str(run)], capsys)
        assert rc == 0, err
        assert f"taking over {run} from a dead run ({owner['host']} pid {owner['pid']}" in err
        assert not lock.exists()  # released on exit


def test_a_live_run_refuses_a_second_and_its_killed_lock_is_taken_over(ws: Workspace, tmp_path, capsys):
    """Real processes: a second run into a folder a live run holds is refused and changes
    nothing; once the first is SIGKILLed, the next run takes its lock over."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "live"
    argv = ["train", "--cache", str(ws.cache), *TRAIN, "--tokens", str(256 * 4000), "--out", str(out)]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, "-m", "sasa", *argv], stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "worker-0.pt").exists():  # it holds the lock and trains
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        before = snapshot(out)
        rc, _, err = run_cli(argv, capsys)
        assert first.poll() is None, log.read_text()[-2000:]
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{out} is in use by a live run ({socket.gethostname()} pid {first.pid}" in err
        # the live run keeps writing (checkpoints go through a transient *.tmp): nothing it had is gone
        kept = lambda snap: {k for k in snap if not k.endswith(".tmp")}  # noqa: E731
        assert kept(snapshot(out)) >= kept(before) and (out / ".sasa-lock").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".sasa-lock").exists()  # SIGKILL leaves it
    rc, _, err = run_cli([*argv[:-4], "--tokens", "2048", "--overwrite", "--out", str(out)], capsys)
    assert rc == 0, err
    assert f"taking over {out} from a dead run ({socket.gethostname()} pid {first.pid}: process {first.pid} " \
           "no longer exists" in err
    assert not (out / ".sasa-lock").exists()


def test_a_torn_lock_is_taken_over(ws: Workspace, capsys):
    run = ws.copy(ws.run, "torn-lock")
    lock = run / ".sasa-lock"
    lock.write_text('{"host": "h')  # a writer killed between creating the lock and filling it
    os.utime(lock, (time.time() - 60, time.time() - 60))
    rc, _, err = run_cli(["train", "--cache", str(ws.cache), *TRAIN, *TOKENS, "--out", str(run)], capsys)
    assert rc == 0, err
    assert "taking over" in err and "lock file is unreadable" in err and not lock.exists()


def _dead_pid() -> int:
    pid = 2 ** 22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_overwrite_replaces_only_what_the_earlier_run_wrote(ws: Workspace, capsys):
    run = ws.copy(ws.run, "overwrite")
    (run / "notes.txt").write_text("mine")
    old_sae = next(p.name for p in run.iterdir() if (p / "config.json").is_file())
    rc, _, err = run_cli(["train", "--cache", str(ws.cache), *TRAIN[:-8], "--groups", "4", "--rank", "2",
                          "--top-s", "1", "--batch-size", "256", "--device", "cpu", *TOKENS,
                          "--overwrite", "--out", str(run)], capsys)
    assert rc == 0, err
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / old_sae).exists()
    assert json.loads((run / "run.json").read_text())["members"][0]["sae"]["groups"] == 4
