"""DeepSpeed's /dev/shm all-reduce buffers: unlinked as early as possible, and after a killed run.

DeepSpeed's CPU backend creates one named buffer per rank,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
(``deepspeed/ops/csrc/cpu/comm/shm.cpp``), when ``LOCAL_SIZE`` equals the world size, and never
unlinks it. Every rank opens its peers' buffers by name when the engine initialises
``deepspeed.comm`` and never later, so the names can go right after the engine build
(``unlink_shm_names``); the mappings stay valid until the processes exit.

A worker killed before that (or a driver killed before its cleanup) leaves names behind. So the
rank 0 of each worker group records its MASTER_ADDR/PORT, which the names carry, in
``DIR/.process_groups/<port>.json`` (``record_process_group``), and ``cleanup_run_shm`` removes
exactly that run's names later, never another run's.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist

__all__ = [
    "PROCESS_GROUP_DIR",
    "cleanup_run_shm",
    "cleanup_shm",
    "record_process_group",
    "record_removed",
    "shm_snapshot",
    "unlink_shm_names",
]

# One file per worker group (port) of a run: what /dev/shm names its DeepSpeed buffers carry.
PROCESS_GROUP_DIR = ".process_groups"


def cleanup_shm(master_addr: str, master_port: int | str) -> list[str]:
    """Remove DeepSpeed's CPU shared-memory all-reduce buffers of one process group.

    Call after the ranks have mapped them (or exited).

    Returns:
        The paths removed.
    """
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_*"
    removed = []
    for path in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def unlink_shm_names(world: int) -> list[str]:
    """Unlink this worker group's buffer names as soon as every rank has mapped them.

    Call right after the engine build, on every rank (it holds a barrier). Unlinking this early
    means a worker killed later (a Tune trial stopped by its scheduler, an OOM kill) leaves
    nothing in /dev/shm.

    Args:
        world: the number of ranks.

    Returns:
        The paths removed (only on each node's local rank 0, the one that unlinks).
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not port:
        return []
    if world > 1 and dist.is_initialized():
        dist.barrier()
    # One process per node unlinks (the node's local rank 0), so the list it returns is complete.
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return []
    return cleanup_shm(addr, port)


def record_process_group(output_dir: Path, addr: str, port: str) -> None:
    """Note a worker group's MASTER_ADDR/PORT in ``DIR/.process_groups`` (its rank 0 calls it)."""
    d = output_dir / PROCESS_GROUP_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{port}.json").write_text(json.dumps({"addr": addr, "port": port}))


def record_removed(output_dir: Path, port: str, rank: int, removed: Iterable[str]) -> None:
    """Note the names a worker removed on its way out, for the driver's ``RunResult``."""
    names = list(removed)
    if not names:
        return
    d = output_dir / PROCESS_GROUP_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{port}.removed.rank{rank}").write_text("\n".join(names))


def shm_snapshot() -> set[str]:
    """The paths in /dev/shm now (empty where there is no /dev/shm)."""
    with contextlib.suppress(OSError):
        return {str(p) for p in Path("/dev/shm").iterdir()}
    return set()


def cleanup_run_shm(
    output_dir: str | os.PathLike[str], before: Iterable[str] = frozenset()
) -> list[str]:
    """Remove the /dev/shm buffers a run in ``output_dir`` left behind; return what was removed.

    ``run_training`` calls this itself in a ``finally``. Call it after a run whose driver was
    killed (e.g. a Tune trial stopped by its scheduler, which kills the trial's actors before
    their cleanup runs): only the names of the worker groups recorded in
    ``DIR/.process_groups`` go.

    Args:
        output_dir: the run directory.
        before: paths that existed before the run (``shm_snapshot``); never touched.

    Returns:
        The paths removed, by the workers themselves at their end and by this call, sorted.
    """
    keep = set(before)
    removed: list[str] = []
    d = Path(output_dir) / PROCESS_GROUP_DIR
    if d.is_dir():
        # What the workers removed themselves at their end ...
        for f in sorted(d.glob("*.removed.rank*")):
            removed += f.read_text().split()
        # ... and what a worker killed before its cleanup left behind.
        for f in sorted(d.glob("*.json")):
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                pg = json.loads(f.read_text())
                removed += [p for p in cleanup_shm(pg["addr"], pg["port"]) if p not in keep]
        shutil.rmtree(d, ignore_errors=True)
    return sorted(set(removed))
