"""Publishing a board's files as one unit: a generation directory, then one pointer swap.

Each file written atomically is not enough: a publisher killed between two files leaves a new
``leaderboard.json`` beside an old ``index.html``. So a publish writes all files into a new
generation directory and then moves one pointer to it; a reader sees the previous board or the
new one, whole.

Layout of a board directory ``<out>/``::

    .generations/gen-<time_ns>-<host>-<pid>-<tag>/   one complete board per generation
    .generations/.partial-<host>-<pid>-<tag>/         a generation being written
    .current -> .generations/gen-...                  the published generation (local)
    current.json                                      {"generation": "gen-..."} (cloud)
    leaderboard.json, index.html, ...                 what users open (see below)

Local and shared POSIX filesystems: ``.current`` is a symlink replaced with ``os.replace`` (one
atomic rename); the user-facing files are fixed symlinks ``<name> -> .current/<name>``, so every
path users know resolves, at open time, into the one published generation. A file a generation
lacks (``best_config.yaml`` before the first finished trial) has no link.

Cloud storage (s3://, gs://): there is no rename and no symlink. The generation is uploaded
whole, then ``current.json`` (one PUT, atomic) names it, then the user-facing files are copied
from it (each one atomic, the set not: a reader who needs the set whole reads ``current.json``
and then the generation it names).

Leftovers of a killed publisher are removed by the next publish: a partial generation whose
publisher (same host) is dead, or older than ``STALE_TEMP_S`` (another host); complete
generations other than the published one and the one before it (a reader may be in it), except
ones newer than the published one and younger than ``_IN_FLIGHT_S`` (a concurrent publisher is
about to swap to it).

Test hook: ``PLORA_TEST_PUBLISH_EXIT_AT`` = ``files`` (after the first file of a generation),
``generation`` (generation complete, before the swap) or ``swap`` (after the swap, before the
links and the clean-up) ends the process there with ``os._exit``, as a kill would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping, Sequence

from plora_ray.store import STALE_TEMP_S, Store

__all__ = [
    "CURRENT_LINK",
    "CURRENT_POINTER",
    "GENERATIONS_DIR",
    "PUBLISH_EXIT_ENV",
    "publish_generation",
]

GENERATIONS_DIR = ".generations"
CURRENT_LINK = ".current"
CURRENT_POINTER = "current.json"
PUBLISH_EXIT_ENV = "PLORA_TEST_PUBLISH_EXIT_AT"
_PARTIAL = ".partial-"
_GEN = "gen-"
# A complete generation newer than the published one, younger than this, may be swapped in by a
# concurrent publisher in a moment (the swap follows the rename by microseconds).
_IN_FLIGHT_S = 60.0


def _exit_here(point: str) -> None:
    if os.environ.get(PUBLISH_EXIT_ENV) == point:
        os._exit(86)


def _tag() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_dead_here(tag: str) -> bool:
    """Whether the publisher named in ``<host>-<pid>-<x>`` ran on this host and is gone."""
    parts = tag.split("-")
    if len(parts) < 3 or parts[0] != socket.gethostname().replace("-", "_"):
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def _gen_time_s(name: str) -> float:
    try:
        return int(name[len(_GEN) :].split("-", 1)[0]) / 1e9
    except ValueError:
        return 0.0


def _removable(
    names: Sequence[str], current: str | None, now: float, ages: Mapping[str, float]
) -> list[str]:
    """The generation entries a publish may delete (see the module docstring)."""
    complete = sorted(n for n in names if n.startswith(_GEN))
    older = [n for n in complete if current is not None and n < current]
    keep = {current, older[-1] if older else None}
    out: list[str] = []
    for n in names:
        if n.startswith(_PARTIAL):
            tag = n[len(_PARTIAL) :]
            if _pid_dead_here(tag) or now - ages.get(n, now) > STALE_TEMP_S:
                out.append(n)
        elif n.startswith(_GEN) and n not in keep:
            newer = current is None or n > current
            if not (newer and now - _gen_time_s(n) < _IN_FLIGHT_S):
                out.append(n)
    return out


def _write_file(path: str, text: str) -> None:
    with open(path, "wb") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _current_local(out: str) -> str | None:
    try:
        return os.path.basename(os.readlink(os.path.join(out, CURRENT_LINK)))
    except OSError:
        return None


def _clean_local(out: str) -> None:
    gens = os.path.join(out, GENERATIONS_DIR)
    names = os.listdir(gens) if os.path.isdir(gens) else []
    ages = {}
    for n in names:
        with contextlib.suppress(OSError):
            ages[n] = os.path.getmtime(os.path.join(gens, n))
    for n in _removable(names, _current_local(out), time.time(), ages):
        shutil.rmtree(os.path.join(gens, n), ignore_errors=True)
    for n in os.listdir(out):  # pointer links of a publisher killed before its swap
        if n.startswith(f"{CURRENT_LINK}-") and _pid_dead_here(n[len(CURRENT_LINK) + 1 :]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out, n))


def _replace_link(path: str, target: str, tag: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f"{CURRENT_LINK}-{tag}")
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _publish_local(out: str, rendered: Mapping[str, str], names: Sequence[str]) -> None:
    gens = os.path.join(out, GENERATIONS_DIR)
    os.makedirs(gens, exist_ok=True)
    _clean_local(out)
    tag = _tag()
    partial = os.path.join(gens, _PARTIAL + tag)
    os.mkdir(partial)
    for name, text in rendered.items():
        _write_file(os.path.join(partial, name), text)
        _exit_here("files")
    gen = f"{_GEN}{time.time_ns():020d}-{tag}"
    os.rename(partial, os.path.join(gens, gen))
    _exit_here("generation")
    current = _current_local(out)
    if current is not None and current > gen:
        # A concurrent publisher already published a newer board: keep it.
        shutil.rmtree(os.path.join(gens, gen), ignore_errors=True)
        return
    _replace_link(os.path.join(out, CURRENT_LINK), os.path.join(GENERATIONS_DIR, gen), tag)
    _exit_here("swap")
    for name in names:
        path = os.path.join(out, name)
        target = os.path.join(CURRENT_LINK, name)
        if name not in rendered:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        elif not (os.path.islink(path) and os.readlink(path) == target):
            _replace_link(path, target, tag)  # a plain file of an older layout, or none yet
    _clean_local(out)


def _publish_cloud(store: Store, rendered: Mapping[str, str]) -> None:
    gen = f"{_GEN}{time.time_ns():020d}-{_tag()}"
    for name, text in rendered.items():
        store.write_atomic(f"{GENERATIONS_DIR}/{gen}/{name}", [text.encode("utf-8")])
        _exit_here("files")
    _exit_here("generation")
    store.write_json(CURRENT_POINTER, {"generation": gen})
    _exit_here("swap")
    for name, text in rendered.items():
        store.write_atomic(name, [text.encode("utf-8")])
    names = store.list_names(GENERATIONS_DIR)
    assert store.fs is not None
    for n in _removable(names, gen, time.time(), {}):
        store.fs.delete_dir(store.path(GENERATIONS_DIR, n))


def publish_generation(out: str, rendered: Mapping[str, str], names: Sequence[str]) -> None:
    """Publish ``rendered`` (file name -> text) as the board of ``out``, as one unit.

    Args:
        out: the board directory (local path or cloud URI).
        rendered: every file of the new board.
        names: every file a board may have (a link to one the new board lacks is removed).

    Raises:
        OSError: writing failed; the previous board stays published.
    """
    store = Store(out)
    if store.is_local:
        _publish_local(store.base, rendered, names)
    else:
        _publish_cloud(store, rendered)
