"""Stops a search driver's own local Ray when the driver dies, however it dies.

A search that attaches to no cluster starts a local Ray in its driver (``ray.init``). Ray's own
reaper stops the GCS and the raylet when that driver is SIGKILLed, but not every process of the
session: the dashboard agent and the runtime-env agent were seen alive a minute later, holding
ports and memory. ``tune_adapter.connect_ray`` therefore starts this watchdog beside the driver::

    python ray_watchdog.py --pid DRIVER_PID --session-dir /tmp/ray/session_...

It polls the driver's pid every half second: portable, and unlike Linux's
``prctl(PR_SET_PDEATHSIG)`` (which fires when the *thread* that forked the child ends, and the
driver forks from any of its threads) it cannot fire while the driver lives. Once the driver is
gone it sends SIGTERM, then SIGKILL, to every process of the session: one whose command line
names the session directory or that holds a file open under it (Ray workers keep their logs there
open). Another Ray on the machine has another session directory and is never touched. After a
normal exit of the driver (``ray.shutdown``) nothing of the session is left and the watchdog just
ends.

Kept free of Ray and of the package's imports: it must start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path

__all__ = ["holds_files_under", "session_processes", "stop_session", "watch"]

POLL_S = 0.5


def holds_files_under(pid_dir: Path, root: str) -> bool:
    """Whether the process of ``/proc/<pid>`` has a file open under ``root`` (Ray workers keep
    their log files in the session directory open; their command line is only
    ``ray::ClassName``)."""
    try:
        fds = list((pid_dir / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(root):
                return True
    return False


def session_processes(session_dir: str) -> list[int]:
    """PIDs of this user's processes of one Ray session (named in their command line or holding
    a file open under ``session_dir``), this process excluded."""
    root = session_dir.rstrip("/") + "/"
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if session_dir in cmdline or holds_files_under(d, root):
            pids.append(int(d.name))
    return pids


def stop_session(session_dir: str, term_wait_s: float = 5.0) -> None:
    """SIGTERM every process of the session, then SIGKILL what is left after ``term_wait_s``."""
    for sig, wait in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 2.0)):
        for pid in session_processes(session_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while session_processes(session_dir) and time.time() < deadline:
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (the driver's parent has not reaped it yet) is dead for our purpose.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def watch(driver_pid: int, session_dir: str) -> None:
    """Wait for ``driver_pid`` to end, then stop what is left of its Ray session."""
    while _alive(driver_pid):
        time.sleep(POLL_S)
    stop_session(session_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True, help="the search driver's pid")
    parser.add_argument("--session-dir", required=True, help="its local Ray's session directory")
    args = parser.parse_args()
    # The driver's Ctrl-C must not end the watchdog before the driver (it has a session of its
    # own already; this is for a watchdog started by hand from a terminal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(args.pid, args.session_dir)


if __name__ == "__main__":
    main()
