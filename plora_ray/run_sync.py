"""A trial's run directory carried between a node's scratch directory and the search's storage.

On local storage a trial's trainer writes straight into ``<search>/runs/<trial_id>/``, which every
node sees (``storage_check`` makes sure). On cloud storage (s3://, gs://, any URI pyarrow opens)
the trainer still needs a real file system, so every node writes into a scratch directory of its
own (``store.scratch_dir``) and what anyone else needs travels through the storage, never through
a node-local path:

* ``RunMirror.push``: the run's files (metrics, phases, config, results, the exported model, the
  attempts log), each uploaded again only when it changed; with ``checkpoints=True`` also every
  complete local checkpoint ``ray/step_NNNNNN`` (``run_in_process`` writes those), its ``COMPLETE``
  marker uploaded last, so a checkpoint whose upload a kill cut short never counts. Ray Train's
  checkpoints (``run_training``) reach the storage through Ray Train itself (its
  ``storage_path`` is the run's URI) and are not copied here.
* ``RunMirror.pull``: the run's small files, and with ``checkpoint=True`` its newest complete
  checkpoint, into this node's scratch directory: a trial (re)started on any node resumes from
  the storage.
* ``RunMirror.mirrored``: push every few seconds while a run trains and once more at its end, so
  a lost node costs at most those seconds of the reports (and nothing of a published checkpoint).
* ``RunMirror.uri_of``: the storage URI of a path the trainer reported (its model, a checkpoint):
  records and the leaderboard name the storage.

``RunSync`` is the picklable address (the search's URI and the trial id) that travels to Ray
Train workers; each process makes its own ``RunMirror`` of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from plora_ray.store import Store, scratch_dir

__all__ = ["CHECKPOINT_COMPLETE", "RUN_CHECKPOINTS_DIR", "RunMirror", "RunSync"]

# The run directory's checkpoint folder (also Ray Train's run name, executors.run_training).
RUN_CHECKPOINTS_DIR = "ray"
# Uploaded last into a pushed checkpoint: a checkpoint counts only with it.
CHECKPOINT_COMPLETE = "COMPLETE"
# Ray Train's record of the run's checkpoints (Train writes it into the storage itself).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Not pulled: the exported model is for readers of the storage, never an input of a run.
MODEL_DIR = "model"
# How often ``mirrored`` pushes while the run trains.
PUSH_EVERY_S = 2.0


def _is_step_dir(name: str) -> bool:
    return name.startswith("step_") and name[5:].isdigit()


@dataclass(frozen=True)
class RunSync:
    """Where a trial's run lives in the search's cloud storage (picklable, sent to workers).

    Args:
        search_uri: the search directory's URI (``SearchDir.uri``).
        trial_id: the trial's id.
    """

    search_uri: str
    trial_id: str

    @property
    def uri(self) -> str:
        """The run directory in the storage, ``<search>/runs/<trial_id>``."""
        return f"{self.search_uri}/runs/{self.trial_id}"

    def local_dir(self) -> Path:
        """This node's scratch copy of the run (``PLORA_SCRATCH`` of the node it is called on)."""
        return Path(scratch_dir(self.search_uri), self.trial_id)

    def mirror(self) -> RunMirror:
        """A mirror between this node's scratch copy and the storage."""
        return RunMirror(self)


class RunMirror:
    """Copies a run between this node's scratch directory and the storage (see the module)."""

    def __init__(self, sync: RunSync) -> None:
        self.sync = sync
        self.local = sync.local_dir()
        self.store = Store(sync.uri)
        # (size, mtime_ns) of each file as last uploaded by this mirror: unchanged files stay.
        self._pushed: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading the storage

    def _remote_files(self, rel: str = "") -> list[str]:
        """Paths (``/``-separated, relative to the run) of the files under ``rel`` in storage."""
        root = self.store.path(*rel.split("/")) if rel else self.store.path()
        sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        base = self.store.path()
        return sorted(
            i.path[len(base) + 1 :]
            for i in self.store.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
        )

    def complete_checkpoints(self) -> list[str]:
        """The names of the storage's complete checkpoints (``step_NNNNNN``), oldest first."""
        names = self.store.list_names(RUN_CHECKPOINTS_DIR)
        return [
            n
            for n in names
            if _is_step_dir(n) and self.store.exists(RUN_CHECKPOINTS_DIR, n, CHECKPOINT_COMPLETE)
        ]

    def holds_run(self) -> bool:
        """Whether the storage holds a run to continue: Ray Train's snapshot or a complete
        checkpoint of ``run_in_process``."""
        return self.store.exists(RUN_CHECKPOINTS_DIR, RAY_SNAPSHOT) or bool(
            self.complete_checkpoints()
        )

    def uri_of(self, path: str | None) -> str | None:
        """The storage URI of ``path``: a file of a scratch copy of this run (on any node) or a
        path on the storage's file system (Ray Train's checkpoint paths); others unchanged."""
        if not path:
            return path
        base = self.store.path()
        if path == base or path.startswith(base + "/"):
            return self.sync.uri + path[len(base) :]
        # A scratch copy on any node ends in .../<search scratch name>/<trial_id>/...
        marker = f"{os.sep}{Path(scratch_dir(self.sync.search_uri)).name}{os.sep}"
        marker += self.sync.trial_id
        at = path.find(marker)
        if at >= 0 and path[at + len(marker) :][:1] in ("", os.sep):
            tail = path[at + len(marker) :].replace(os.sep, "/")
            return self.sync.uri + tail
        return path

    def bytes_of(self, uri: str | None) -> int | None:
        """Total size of the files at or under ``uri`` (a URI of this run), None when unknown."""
        if not uri or not uri.startswith(self.sync.uri):
            return None
        rel = uri[len(self.sync.uri) :].strip("/")
        sel = pafs.FileSelector(self.store.path(*rel.split("/")), recursive=True)
        try:
            infos = self.store.fs.get_file_info(sel)
        except (FileNotFoundError, NotADirectoryError, OSError):
            return None
        return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)

    # ------------------------------------------------------------------ storage -> scratch

    def _download(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self.store.read_bytes(*rel.split("/")))
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def pull_files(self, *names: str) -> None:
        """Make the scratch copies of ``names`` (run-relative) what the storage holds: copied
        when there, removed when not (the storage is the run's truth)."""
        for name in names:
            dest = self.local / name
            if self.store.exists(*name.split("/")):
                self._download(name, dest)
            else:
                dest.unlink(missing_ok=True)

    def pull(self, checkpoint: bool) -> None:
        """Copy the run's files from the storage into this node's scratch copy (not the model
        and not the checkpoints); with ``checkpoint``, also the newest complete checkpoint."""
        for rel in self._remote_files():
            top = rel.split("/", 1)[0]
            if top in (RUN_CHECKPOINTS_DIR, MODEL_DIR) or top.startswith("."):
                continue
            self._download(rel, self.local / rel)
        if not checkpoint:
            return
        complete = self.complete_checkpoints()
        if not complete:
            return
        name = complete[-1]
        final = self.local / RUN_CHECKPOINTS_DIR / name
        if final.is_dir():
            return
        # Downloaded beside under a temporary name and renamed: a step_* directory in the
        # scratch copy is always complete (what executors.newest_checkpoint relies on).
        tmp = final.parent / f".{name}.pull{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        prefix = f"{RUN_CHECKPOINTS_DIR}/{name}/"
        for rel in self._remote_files(prefix.rstrip("/")):
            if rel != prefix + CHECKPOINT_COMPLETE:
                self._download(rel, tmp / rel[len(prefix) :])
        os.replace(tmp, final)

    # ------------------------------------------------------------------ scratch -> storage

    def _upload(self, rel: str, src: Path) -> None:
        st = src.stat()
        key = (st.st_size, st.st_mtime_ns)
        if self._pushed.get(rel) == key:
            return
        with open(src, "rb") as fh:
            self.store.write_atomic(rel, iter(lambda: fh.read(1 << 20), b""))
        self._pushed[rel] = key

    def push_files(self, *names: str) -> None:
        """Make the storage's copies of ``names`` (run-relative) what the scratch copy holds:
        uploaded when there, removed when not."""
        with self._lock:
            for name in names:
                src = self.local / name
                if src.is_file():
                    self._upload(name, src)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        self.store.fs.delete_file(self.store.path(*name.split("/")))
                    self._pushed.pop(name, None)

    def push(self, checkpoints: bool) -> None:
        """Upload what changed in the scratch copy (not its hidden files, not ``ray/``); with
        ``checkpoints``, also each complete local checkpoint not yet in the storage (its marker
        last), and drop the storage's older checkpoints that the run no longer keeps."""
        if not self.local.is_dir():
            return
        with self._lock:
            for src in sorted(self.local.rglob("*")):
                rel = src.relative_to(self.local).as_posix()
                parts = rel.split("/")
                if parts[0] == RUN_CHECKPOINTS_DIR or any(p.startswith(".") for p in parts):
                    continue
                # FileNotFoundError: a file the run replaced while this walked the directory.
                with contextlib.suppress(FileNotFoundError):
                    if src.is_file():
                        self._upload(rel, src)
            if checkpoints:
                self._push_checkpoints()

    def _push_checkpoints(self) -> None:
        root = self.local / RUN_CHECKPOINTS_DIR
        local = sorted(p.name for p in root.glob("step_*") if p.is_dir() and _is_step_dir(p.name))
        if not local:
            return
        remote = self.complete_checkpoints()
        for name in local:
            if name in remote:
                continue
            try:
                for src in sorted((root / name).rglob("*")):
                    if src.is_file():
                        rel = src.relative_to(self.local).as_posix()
                        self._upload(rel, src)
            except FileNotFoundError:
                continue  # pruned by the run while uploading: a newer one is on disk
            self.store.write_atomic(f"{RUN_CHECKPOINTS_DIR}/{name}/{CHECKPOINT_COMPLETE}", [b""])
        # The run keeps its newest checkpoint.keep; the storage keeps the same ones.
        for name in self.store.list_names(RUN_CHECKPOINTS_DIR):
            if _is_step_dir(name) and name not in local and name < local[-1]:
                with contextlib.suppress(FileNotFoundError):
                    # The marker first: a half-deleted checkpoint never counts.
                    self.store.fs.delete_file(
                        self.store.path(RUN_CHECKPOINTS_DIR, name, CHECKPOINT_COMPLETE)
                    )
                    self.store.fs.delete_dir(self.store.path(RUN_CHECKPOINTS_DIR, name))

    @contextlib.contextmanager
    def mirrored(self, checkpoints: bool, every_s: float = PUSH_EVERY_S) -> Iterator[None]:
        """Push every ``every_s`` seconds in a background thread while the body runs, and once
        more when it ends (also when it raised)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.push(checkpoints)
                except OSError as exc:  # the storage hiccuped: the next push tries again
                    print(f"warning: pushing {self.local} to {self.sync.uri}: {exc}")

        thread = threading.Thread(target=loop, daemon=True, name="plora-run-sync")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.push(checkpoints)
