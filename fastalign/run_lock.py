"""One run per output directory: rank 0 holds an exclusive lock on OUTPUT_DIR/.fastalign.lock for
the run's life.

Details: docs/design.md section 7.28.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from fastalign.distributed import broadcast_object
from fastalign.errors import ConfigError

log = logging.getLogger("fastalign.run_lock")

LOCK_FILE = ".fastalign.lock"
_ATTEMPTS = 3  # a lock file replaced between our open and our flock (a release, a takeover): retry


class OutputDirBusy(ConfigError):
    """Another live run holds the output directory's lock (names it and what to do)."""


@dataclass
class RunLock:
    """The lock file and its locked descriptor on rank 0; `fd` is None on the other ranks."""

    path: Path
    fd: int | None = None

    def release(self) -> None:
        """Remove the lock file (when it is still ours) and drop the flock; idempotent."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()
        except OSError:  # the directory went away: nothing left to clean
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_output_dir(output_dir: str | os.PathLike) -> RunLock:
    """Collective: rank 0 takes OUTPUT_DIR/.fastalign.lock (creating the directory); every rank
    returns, or every rank raises the same ConfigError (another live run holds it, or the
    directory cannot be created)."""
    root = Path(output_dir)
    lock, problem = RunLock(root / LOCK_FILE), None
    if dist.get_rank() == 0:
        try:
            lock = take_lock(root)
        except OutputDirBusy as err:
            problem = str(err)
        except OSError as err:  # e.g. the path is a file
            problem = f"--output_dir {root}: {err.strerror or err}"
    problem = broadcast_object(problem)
    if problem is not None:
        raise ConfigError(problem)
    return lock


def take_lock(root: Path) -> RunLock:
    """This process takes `root`/.fastalign.lock or raises OutputDirBusy naming the live owner.

    The file is opened without truncation: a refused trainer changes nothing of the owner's.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    for _ in range(_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = _read_owner(path)
            if owner is None or owner.get("host") != socket.gethostname() or _alive(owner.get("pid")):
                raise OutputDirBusy(_busy_message(root, owner)) from None
            log.warning("%s: its owner, pid %s on this host (started %s), is no longer running but its "
                        "lock is still held (by a process it forked?): replacing the lock file",
                        path, owner.get("pid"), owner.get("started"))
            path.unlink(missing_ok=True)
            continue
        if not _same_file(fd, path):  # the owner released (removed) the file while we waited
            os.close(fd)
            continue
        previous = _read_owner(path)
        if previous is not None:
            log.warning("%s: taking over the stale lock of pid %s on host %s (started %s), which is no "
                        "longer running (its lock was free)", path, previous.get("pid"),
                        previous.get("host"), previous.get("started"))
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        return RunLock(path, fd)
    raise OutputDirBusy(f"--output_dir {root}: {path} kept being replaced while this run tried to lock "
                        "it: another fastalign run is starting there; choose another --output_dir")


def _busy_message(root: Path, owner: dict | None) -> str:
    if owner is None:  # the owner locked the file and has not written its details yet
        who, stop = "another fastalign run (starting; its details are not written yet)", "stop it"
    else:
        pid, host = owner.get("pid"), owner.get("host")
        who = f"another fastalign run: pid {pid} on host {host} (started {owner.get('started')})"
        stop = f"stop it (kill {pid} on {host}: it saves a checkpoint and exits)"
    return (f"--output_dir {root} is in use by {who}, which holds {root / LOCK_FILE}. Nothing in "
            f"{root} was touched. Wait for that run to finish (then continue it with "
            f"--resume_from_checkpoint auto), {stop}, or choose another --output_dir")


def _read_owner(path: Path) -> dict | None:
    """The owner recorded in the lock file; None when it is empty, unreadable or gone."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _alive(pid) -> bool:
    """Whether process `pid` exists on this host (a non-integer pid counts as alive: we cannot tell)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced since)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
