"""One builder for a shared folder when several runs start together.

The runs of a sweep often start at once on one data folder: each would find the synthetic set, the
stand-in encoders or the feature cache missing and build it, three times over, racing in the
renames. `BuildLock` lets the first build and the others wait, then read what it wrote:

    with BuildLock(cache_dir, "the feature cache") as lock:
        if still_missing():   # checked again: another run may have built it while this one waited
            build()

The lock is a file beside the folder (`<folder>.lock`), holding its owner (host, process id, a
token and when it started): written under a name of its own, then hard-linked to the lock's name,
which fails when the lock is held (atomic on local disks, NFS and Lustre alike) and never shows a
lock without its owner. While held, a thread touches it every `heartbeat` seconds. A lock left by a killed run
never blocks for ever: it is taken over, with a warning, when its process is gone (same host) or
when it has shown no sign of life (no touch, seen on this process's own clock, so the hosts'
clocks need not agree) for `stale_after` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # twelve missed heartbeats: a run that is alive touches its lock far more often


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (what its file says)."""

    host: str
    pid: int
    token: str
    started: float

    def __str__(self) -> str:
        return f"process {self.pid} on host {self.host}"

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, time.time())


def build_once(target: str | os.PathLike, what: str, built: Callable[[], bool], build: Callable[[], object]) -> str:
    """`build()` unless `built()`, under `target`'s `BuildLock`, `built()` asked again once the lock
    is held (another run may have built it meanwhile). Returns the lock's `note` when another run
    built it while this one waited, else ""."""
    if built():
        return ""
    with BuildLock(target, what) as lock:
        if built():
            return lock.note
        build()
        return ""


class BuildLock:
    """The lock for building `target` (a folder, or a file), named for messages by `what`.

    After `__enter__`, `waited_for` is the holder this process waited for until it released the
    lock (None: the lock was free, or taken over from a dead holder) and `waited` the seconds it
    waited; `note` says so in one line, for the caller to print when it finds the build done.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        what: str,
        stale_after: float = STALE_AFTER_S,
        heartbeat: float = HEARTBEAT_S,
        poll: float = 0.5,
    ):
        self.target, self.what = Path(target), what
        self.path = self.target.with_name(self.target.name + ".lock")
        self.stale_after, self.heartbeat, self.poll = stale_after, heartbeat, poll
        self.waited_for: Holder | None = None
        self.waited = 0.0
        self._me: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def note(self) -> str:
        if self.waited_for is None:
            return ""
        return f"{self.what} ({self.target}): built by {self.waited_for}, read here after waiting {self.waited:.0f} s"

    def __enter__(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start, seen = time.monotonic(), {}  # what each lock file looked like, and since when (our clock)
        me = Holder.me()
        # The owner is written first, into a file of this process's own, and linked to the lock's
        # name in one step that fails if the lock is held: a lock is never seen without its owner.
        mine = self.path.with_name(f"{self.path.name}.{me.token}")
        mine.write_text(json.dumps(asdict(me)))
        try:
            while True:
                try:
                    os.link(mine, self.path)
                    break
                except FileExistsError:
                    holder = _holder(self.path)
                    if holder is not None and self._stale(holder, seen):
                        continue
                    if self.waited_for is None and holder is not None:
                        self.waited_for = holder
                        print(
                            f"data: waiting for {holder}, which is building {self.what} ({self.path})", file=sys.stderr
                        )
                    time.sleep(self.poll)
        finally:
            mine.unlink(missing_ok=True)
        self._me, self.waited = me, time.monotonic() - start if self.waited_for else 0.0
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat {self.path.name}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = _holder(self.path)
        if holder is not None and holder.token == self._me.token:  # still ours (not taken over)
            self.path.unlink(missing_ok=True)

    def _stale(self, holder: Holder, seen: dict) -> bool:
        """Whether `holder`'s lock is stale; if so it is taken over (moved away, with a warning)
        and True is returned, for the caller to try again."""
        try:
            stamp = (holder.token, self.path.stat().st_mtime_ns)
        except FileNotFoundError:
            return True  # released meanwhile: try again
        seen.setdefault(stamp, time.monotonic())
        if holder.host == socket.gethostname() and holder.pid > 0 and not _alive(holder.pid):
            why = "its process is gone"
        elif time.monotonic() - seen[stamp] >= self.stale_after:
            why = f"no sign of life for {self.stale_after:g} s"
        else:
            return False
        moved = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return True  # another waiter took it over first
        taken = _holder(moved)
        if taken is not None and taken.token != holder.token:  # a newer lock, made between the look and the move
            with contextlib.suppress(FileExistsError):  # put back, unless yet another one is there now
                os.link(moved, self.path)
            moved.unlink(missing_ok=True)
            return True
        moved.unlink(missing_ok=True)
        self.waited_for = None  # nobody built it: this process will
        logger.warning("taking over %s, left by %s (%s): building %s here", self.path, holder, why, self.what)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # taken over (this process stalled past stale_after)
                return


def _holder(path: Path) -> Holder | None:
    """A lock file's holder; None if it is gone. A file still being written (empty, or cut short)
    reads as an unknown holder, judged by its age alone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text))
    except (json.JSONDecodeError, TypeError):
        return Holder("(unknown)", -1, f"unreadable: {text!r}", 0.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True
