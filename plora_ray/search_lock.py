"""One driver per search directory: the lock file ``<search dir>/driver.lock``.

Two drivers on one search train the same trial twice into one run directory and duplicate
samples, so ``run_search`` takes this lock before it writes anything and holds it to the end.
The lock file says who holds it (host, pid, start time) and a heartbeat that a thread refreshes
every ``HEARTBEAT_S`` seconds; a lock is stale, and taken over, when its heartbeat is older than
``STALE_AFTER_BEATS`` beats (a driver whose machine died) or when its holder ran on this host
and its pid is gone (a killed driver). Anything else is refused with the holder's name.

Guarantees by storage:

* Local and shared POSIX filesystems (NFS included): the lock is created with ``os.link`` of a
  finished temp file, which fails when the name exists, so exactly one of two drivers racing
  for it wins. A stale lock is first renamed to a name of the taker's own (only one taker's
  rename succeeds) and checked to be the lock it judged stale before it is removed.
* Cloud storage (s3://, gs://): pyarrow offers no conditional write, so the lock is written and
  read back after a pause; two drivers starting within that pause may both proceed. A
  documented limitation: start a cloud search from one place.

The heartbeat uses wall-clock time, so the hosts of a shared filesystem need synchronised clocks
(NTP); a driver host whose clock runs more than ``STALE_AFTER_BEATS * HEARTBEAT_S`` behind
could lose its lock to a second driver.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from plora_ray.config import ConfigError
from plora_ray.store import SearchDir, Store, json_text

__all__ = [
    "HEARTBEAT_S",
    "LOCK_FILE",
    "STALE_AFTER_BEATS",
    "LockHolder",
    "SearchLock",
    "read_lock",
    "take_search_lock",
]

LOCK_FILE = "driver.lock"
HEARTBEAT_S = 5.0
# A heartbeat this many beats old means the driver is gone (a live one refreshes every beat).
STALE_AFTER_BEATS = 6
# Cloud storage: how long to wait before reading a written lock back (see the module docstring).
_CLOUD_SETTLE_S = 2.0


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the driver holding it."""

    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        beat = max(0.0, time.time() - self.heartbeat_at)
        return f"host {self.host}, pid {self.pid}, since {since} (heartbeat {beat:.0f} s ago)"

    def is_stale(self, now: float) -> bool:
        """Whether the holder is gone: an old heartbeat, or a dead pid on this host."""
        if now - self.heartbeat_at > STALE_AFTER_BEATS * HEARTBEAT_S:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def read_lock(store: Store) -> LockHolder | None:
    """The holder named by ``driver.lock`` under ``store``, or None when there is no lock.

    A lock file that cannot be parsed (a writer killed mid-write on storage without atomic
    writes) reads as a holder with a heartbeat of 0: stale.
    """
    if not store.exists(LOCK_FILE):
        return None
    raw: Any = store.read_json(LOCK_FILE)
    try:
        return LockHolder(
            host=str(raw["host"]),
            pid=int(raw["pid"]),
            started_at=float(raw["started_at"]),
            heartbeat_at=float(raw["heartbeat_at"]),
            token=str(raw["token"]),
        )
    except (TypeError, KeyError, ValueError):
        return LockHolder(host="?", pid=-1, started_at=0.0, heartbeat_at=0.0, token="")


class SearchLock:
    """The driver lock of one search directory, held by this process.

    Args:
        sdir: the search directory.
    """

    def __init__(self, sdir: SearchDir) -> None:
        self.sdir = sdir
        self.store = sdir.store
        self.me = LockHolder(
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
            heartbeat_at=time.time(),
            token=uuid.uuid4().hex,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _content(self, heartbeat_at: float) -> bytes:
        d = dict(dataclasses.asdict(self.me), heartbeat_at=heartbeat_at)
        return json_text(d).encode("utf-8")

    def _try_create(self) -> bool:
        """Create the lock file if it does not exist; True when this call created it."""
        if not self.store.is_local:
            if self.store.exists(LOCK_FILE):
                return False
            self.store.write_atomic(LOCK_FILE, [self._content(time.time())])
            time.sleep(_CLOUD_SETTLE_S)
            held = read_lock(self.store)
            return held is not None and held.token == self.me.token
        os.makedirs(self.store.base, exist_ok=True)
        tmp = self.store.path(f".{LOCK_FILE}.{self.me.token}.tmp")
        with open(tmp, "wb") as f:
            f.write(self._content(time.time()))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.store.path(LOCK_FILE))  # fails if the name exists, even on NFS
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _remove_stale(self, stale: LockHolder) -> None:
        """Remove the lock judged stale, and only that one (another taker may have won)."""
        if not self.store.is_local:
            held = read_lock(self.store)
            if held is not None and held.token == stale.token:
                self.store.fs.delete_file(self.store.path(LOCK_FILE))
            return
        aside = self.store.path(f".{LOCK_FILE}.{self.me.token}.stale")
        try:
            os.rename(self.store.path(LOCK_FILE), aside)
        except FileNotFoundError:
            return  # another taker moved it first
        try:
            with open(aside, encoding="utf-8") as f:
                token = json.loads(f.read()).get("token", "")
        except (OSError, ValueError, AttributeError):
            token = ""
        if token != stale.token:
            # Between our read and our rename another driver took the lock: give it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.store.path(LOCK_FILE))
        os.unlink(aside)

    def acquire(self) -> SearchLock:
        """Take the lock (taking over a stale one) and start the heartbeat.

        Raises:
            ConfigError: another live driver holds the lock (its host, pid and start time).
        """
        for _ in range(5):
            if self._try_create():
                self._start_heartbeat()
                atexit.register(self.release)
                return self
            held = read_lock(self.store)
            if held is None:
                continue  # released between our attempt and our read
            same_process = held.host == self.me.host and held.pid == self.me.pid
            if same_process or held.is_stale(time.time()):
                if not same_process:
                    print(
                        f"warning: taking over the stale driver lock of {self.sdir.uri} "
                        f"({held.describe()})",
                        file=sys.stderr,
                    )
                _release_held_by_this_process(self.store.display(LOCK_FILE))
                self._remove_stale(held)
                continue
            raise ConfigError(
                [
                    f"{self.store.display(LOCK_FILE)}: expected no other driver on this search, "
                    f"found one running ({held.describe()}); wait for it to finish, or stop it "
                    f"(a lock whose heartbeat is {STALE_AFTER_BEATS * HEARTBEAT_S:.0f} s old or "
                    "whose process has died on this host is taken over automatically)"
                ]
            )
        raise ConfigError(
            [f"{self.store.display(LOCK_FILE)}: could not take the driver lock (contended)"]
        )

    def _start_heartbeat(self) -> None:
        _HELD[self.store.display(LOCK_FILE)] = self
        self._thread = threading.Thread(
            target=self._beat, name=f"search-lock-heartbeat:{self.sdir.uri}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            held = read_lock(self.store)
            if held is None or held.token != self.me.token:
                self.lost = True
                print(
                    f"warning: the driver lock of {self.sdir.uri} is no longer ours "
                    f"({held.describe() if held else 'removed'}); another driver may be running",
                    file=sys.stderr,
                )
                return
            with contextlib.suppress(OSError):
                self.store.write_atomic(LOCK_FILE, [self._content(time.time())])

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * HEARTBEAT_S)
        _HELD.pop(self.store.display(LOCK_FILE), None)
        held = read_lock(self.store)
        if held is not None and held.token == self.me.token:
            with contextlib.suppress(FileNotFoundError):
                if self.store.is_local:
                    os.unlink(self.store.path(LOCK_FILE))
                else:
                    self.store.fs.delete_file(self.store.path(LOCK_FILE))

    def __enter__(self) -> SearchLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# Locks this process holds, by lock path: a second run_search of the same search in the same
# process (a resume after an error, in a notebook or a test) takes its own lock over.
_HELD: dict[str, SearchLock] = {}


def _release_held_by_this_process(path: str) -> None:
    lock = _HELD.pop(path, None)
    if lock is not None:
        lock._stop.set()


def take_search_lock(sdir: SearchDir, *, fresh: bool) -> SearchLock:
    """Take ``sdir``'s driver lock before anything of the search is written.

    Args:
        sdir: the search directory.
        fresh: a new search (not ``--resume``): refused if a search appeared there while the
            lock was being taken (two fresh starts at once).

    Returns:
        The held lock; ``release()`` it when the search ends (it is also released at exit).

    Raises:
        ConfigError: another driver holds the lock, or (``fresh``) a search now exists there.
    """
    lock = SearchLock(sdir).acquire()
    if fresh and sdir.exists():
        lock.release()
        raise ConfigError(
            [
                f"{sdir.uri}: a search was started there a moment ago by another driver; "
                "pass --resume to continue it or choose another --name / --storage"
            ]
        )
    return lock
