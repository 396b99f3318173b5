"""Guarding a run's output folder: one live run at a time, and no silent overwrite of results.

``claim(out, cfg, ...)`` is entered once per run (by ``train``, or by the driver of a Ray run)
before anything is written. It

1. checks that ``out`` can be written (``sasa.errors.check_writable``);
2. takes the folder's lock ``out/.sasa-lock``: a file created with ``O_CREAT | O_EXCL`` (atomic
   on local disks and on NFS v3+/Lustre/GPFS, the shared file systems clusters use) holding the
   owner's host, pid, start time and a random token. A thread refreshes its mtime every
   ``HEARTBEAT_S`` seconds. A second run finds the file and refuses with one line naming the
   owner. A lock whose owner is gone (same host and its pid no longer exists, a heartbeat
   older than ``STALE_S`` from any host, or content left unreadable for ``TORN_S`` by a writer
   that died creating it) is taken over with a one-line notice on stderr. The lock
   is removed when the run ends, by success, error or Ctrl-C; a SIGKILL leaves it behind to be
   taken over as above;
3. refuses a run whose config differs from the ``run.json`` already in ``out`` unless the
   run resumes (the checkpoint then decides) or ``overwrite`` is given, in which case the files
   the earlier run wrote (run.json, checkpoints/, its SAE folders) are removed first. Nothing
   else in the folder is touched: sasa never deletes what it did not write.

The take-over is the one racy step: two runs that find the same dead lock at the same moment
both rename it away; each then checks that the file it renamed is the dead one before it
creates its own, so at most one of them wins, and the other refuses as for a live lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from sasa.errors import SasaError, check_writable

LOCK_NAME = ".sasa-lock"
RUN_FILE = "run.json"
#: Seconds between refreshes of the lock's mtime by its live owner.
HEARTBEAT_S = 30.0
#: A lock not refreshed for this long belongs to a dead run (any host): 4 missed heartbeats.
STALE_S = 120.0
#: A lock without readable content this old was torn at creation (its owner writes it at once).
TORN_S = 10.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    """The lock's content, {} for an unreadable one, None when there is no lock."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = {}
    return {**(info if isinstance(info, dict) else {}), "age_s": age}


def _dead_reason(info: dict) -> str | None:
    """Why the lock's owner is dead, or None when it may be alive."""
    if not info.get("token") and info["age_s"] > TORN_S:
        return f"its lock file is unreadable and {info['age_s']:.0f} s old (torn when it was written)"
    if info["age_s"] > STALE_S:
        return f"its heartbeat is {info['age_s']:.0f} s old (stale after {STALE_S:.0f} s)"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
            and not _pid_alive(info["pid"]):
        return f"process {info['pid']} no longer exists on {info['host']}"
    return None


class OutputLock:
    """The lock file of one output folder, held by this process while a run writes there."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "token": self.token, "argv": sys.argv[:8]}, f)
        return True

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                break
            info = _read_lock(self.path)
            if info is None:
                continue  # released between our attempt and the read: try again
            reason = _dead_reason(info)
            owner = f"{info.get('host', '?')} pid {info.get('pid', '?')}"
            if reason is None:
                when = info.get("started")
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) \
                    if isinstance(when, (int, float)) else "at an unknown time"
                raise SasaError(f"{self.path.parent} is in use by a live run ({owner}, started "
                                f"{started}); wait for it to end or pass another --out")
            aside = self.path.with_name(f"{LOCK_NAME}.dead-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = _read_lock(aside) or {}
            if moved.get("token") != info.get("token"):  # we moved a fresh lock: put it back
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            print(f"sasa: taking over {self.path.parent} from a dead run ({owner}: {reason})",
                  file=sys.stderr)
        else:
            raise SasaError(f"could not take the lock {self.path}; another run is starting there, "
                            "retry in a moment or pass another --out")
        self._thread = threading.Thread(target=self._beat, name="sasa-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info = _read_lock(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {json.dumps(old.get(k, '<absent>'))[:60]} -> {json.dumps(new.get(k, '<absent>'))[:60]}"
            for k in keys if old.get(k) != new.get(k)]


def check_rerun(out: Path, run_json: dict, *, resume: bool, overwrite: bool) -> None:
    """Refuse a changed rerun into ``out`` (see the module docstring); with ``overwrite``,
    remove what the earlier run wrote."""
    path = out / RUN_FILE
    if resume or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        old = None
    if old == run_json:
        return  # the same command again: it retrains to the same result
    if not overwrite:
        diffs = _diff(old, run_json) if isinstance(old, dict) else [f"{path} is damaged"]
        members = [d for d in diffs if d.startswith("members:")]
        shown = "; ".join(([d for d in diffs if not d.startswith("members:")] + members)[:3])
        raise SasaError(f"{out} holds an earlier run with a different config ({shown}); pass "
                        "--resume to continue it, a new --out, or --overwrite to replace it")
    names = [m.get("name") for m in (old or {}).get("members", []) if isinstance(m, dict)]
    for name in names:
        if isinstance(name, str) and name and "/" not in name and not name.startswith("."):
            shutil.rmtree(out / name, ignore_errors=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    path.unlink()


@contextlib.contextmanager
def claim(out: str | Path, run_json: dict, *, resume: bool = False, overwrite: bool = False):
    """Check, lock and (with ``overwrite``) clear ``out`` for one run; release on exit."""
    if "://" in str(out):
        raise SasaError(f"--out {out} is a URL; a run writes to a folder (on a cluster, a shared "
                        "file system mounted on every node)")
    out = Path(out)
    check_writable(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    ok = False
    try:
        check_rerun(out, run_json, resume=resume, overwrite=overwrite)
        yield out
        ok = True
    finally:
        lock.release()
        if created and not ok and not any(out.iterdir()):
            out.rmdir()  # a refused first run leaves no empty folder behind
