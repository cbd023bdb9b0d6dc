"""One writer per run folder: ``--out/run.lock``, held by the process that writes the run for the run's life.

``train student`` takes the lock before pre-flight reads the folder (rank 0 under a
launcher: the only process that writes) and keeps it until the command ends; a
second ``train student`` on the same ``--out`` meanwhile (a ``--resume`` started
by hand, a job scheduled twice) is refused in one line naming the holder: its
pid, host, start time and command, which the holder wrote into the lock file.

The lock is ``fcntl.flock`` on that file, so the kernel releases it when the
holder dies however it dies (SIGKILL included): a lock file left by a dead run
blocks nothing, and the next run takes it and writes its own details. The
holder removes the file when it ends (while still holding it); a process that
opened the file just before then finds, once it holds the lock, that the
path names another file or none, and starts over, so two processes never both
hold "the" lock. Where ``flock`` is missing (not POSIX) runs are not locked.

The command recorded is the holder's command line with every ``--storage-option``
value replaced and credentials of locations removed (:mod:`store.locations`):
the file is part of the run's folder, and nothing there holds a credential.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable

from store.locations import REDACTED, redact_text, secret_values

from .config import TrainError

LOCK_FILE = "run.lock"
#: options whose values are never recorded (their names are)
_HIDDEN_OPTIONS = ("--storage-option", "-o")

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None


def recorded_command(argv: Iterable[str], secrets: Iterable[str] = ()) -> str:
    """``argv`` as the lock file records it: ``--storage-option KEY=VALUE`` as ``KEY=<redacted>``, each argument
    through :func:`store.locations.redact_text` (``user:password@`` of locations, ``secrets``)."""
    words, hide_next = [], False
    for word in map(str, argv):
        if hide_next:
            word, hide_next = f"{word.split('=', 1)[0]}={REDACTED}", False
        elif word in _HIDDEN_OPTIONS:
            hide_next = True
        elif word.startswith("--storage-option="):
            word = f"--storage-option={word.split('=', 2)[1]}={REDACTED}"
        words.append(redact_text(word, secrets))
    return " ".join(words)


def describe(holder: dict) -> str:
    """A lock file's record in words: ``pid 12 on host h since 2026-01-02T03:04:05Z: train student ...``."""
    if not holder:
        return "a process that has not written its details yet"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started_at', '?')}: "
            f"{holder.get('command') or '?'}")


class RunLock:
    """The lock on ``out`` (:meth:`take`), released by :meth:`release` (or the holder's death)."""

    def __init__(self, out: Path, fd: int | None, made: list[Path]):
        self.out, self._fd, self._made = out, fd, made

    @property
    def path(self) -> Path:
        return self.out / LOCK_FILE

    @classmethod
    def take(cls, out: Path, *, storage_options: dict | None = None, cache: str | None = None) -> "RunLock":
        """Hold the lock on ``out`` (made if missing, with its parents; removed again at release when the run left
        them empty); TrainError naming the holder when another process holds it.

        Where ``out`` cannot be made or written (a file, a read-only folder) nothing is locked: pre-flight
        refuses that ``out`` with its own message.
        """
        if fcntl is None:
            return cls(out, None, [])
        made = []
        try:
            missing = out
            while not missing.exists() and missing != missing.parent:
                made.append(missing)
                missing = missing.parent
            out.mkdir(parents=True, exist_ok=True)
        except OSError:
            return cls(out, None, [])
        lock = cls(out, None, made)
        try:
            lock._fd = lock._hold()
        except OSError:  # not writable: pre-flight says so
            lock._remove_made()
            return cls(out, None, [])
        except TrainError:
            lock._remove_made()
            raise
        secrets = secret_values(storage_options, [cache] if cache else [])
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": recorded_command([os.path.basename(sys.argv[0]) or "train", *sys.argv[1:]], secrets)}
        os.ftruncate(lock._fd, 0)
        os.pwrite(lock._fd, (json.dumps(record) + "\n").encode(), 0)
        return lock

    def _hold(self) -> int:
        """The descriptor of the lock file in place, locked by this process; TrainError naming the holder."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder went with a refused run that made it: make it again
                self.out.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise TrainError(f"--out {self.out} is being written by another run ({describe(holder)}); wait for "
                                 f"it to end (a killed run holds nothing), or choose another --out") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                in_place = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                in_place = False
            if in_place:
                return fd
            os.close(fd)  # its holder ended and removed it meanwhile: lock the file now in place

    def release(self) -> None:
        """Remove the lock file (still holding it) and let go; folders :meth:`take` made that hold nothing else
        are removed too."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # holds the run's files (or someone else's)
                break
        self._made = []

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_record(fd: int) -> dict:
    try:
        text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def holder_of(out: Path) -> dict | None:
    """What the lock file of ``out`` records (the holder's pid, host, start, command), or None without one."""
    try:
        fd = os.open(Path(out) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_record(fd)
    finally:
        os.close(fd)
