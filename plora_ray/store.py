"""Files a search and a run leave behind, written and read in one place.

* ``atomic_write`` / ``atomic_write_json``: the one atomic writer. A local file goes through a temp
  file in the same directory and ``os.replace`` (a reader sees the old file or the new one, never
  half of one); on an object store (s3://, gs://, ...) one PUT of the finished bytes is atomic.
  Files are created with the permissions the umask allows (team storage stays team-readable).
* ``read_metrics``: the one reader of a run's ``metrics.jsonl``.
* ``Store``: reads and writes under a local path or a cloud URI (through pyarrow's filesystems).
* ``SearchDir``: a search directory ``<storage>/<name>/``: ``search.json``, one
  ``trials/<trial_id>.json`` per finished trial, ``runs/<trial_id>/`` (local storage).
* ``TrialRecord``: the typed record of one finished trial, written by the search and read by the
  leaderboard.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.fs as pafs

from plora_ray.config.conversion import is_finite_number

__all__ = [
    "METRICS_FILE",
    "STALE_TEMP_S",
    "TERMINAL_STATUSES",
    "RecordError",
    "SearchDir",
    "Store",
    "TrialRecord",
    "TrialStatus",
    "atomic_write",
    "atomic_write_json",
    "is_uri",
    "read_metrics",
    "read_records",
    "scratch_dir",
]

METRICS_FILE = "metrics.jsonl"
TrialStatus = Literal["completed", "early_stopped", "diverged", "failed"]
TERMINAL_STATUSES: tuple[TrialStatus, ...] = ("completed", "early_stopped", "diverged", "failed")
# A temp file older than this is a leftover of a killed writer (a live write takes milliseconds).
STALE_TEMP_S = 600.0


def is_uri(path: str) -> bool:
    """Whether ``path`` names a remote filesystem (``s3://``, ``gs://``, ...; not ``file://``)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path)) and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    # numpy scalars and the like: anything with .item() becomes the Python number it holds.
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def json_text(obj: Any, indent: int | None = 2) -> str:
    """JSON as every file of the project writes it (numpy scalars as numbers, others as str)."""
    return json.dumps(obj, indent=indent, default=_json_default)


# --------------------------------------------------------------------------- reading and writing


class Store:
    """Reads and atomic writes under a local directory or a cloud URI.

    Args:
        root: a local path (``~`` expanded, ``file://`` allowed) or a URI pyarrow understands.
        filesystem: a pyarrow filesystem to use instead of the one the URI names (tests).
    """

    def __init__(self, root: str | os.PathLike[str], filesystem: Any = None) -> None:
        root = str(root)
        self.root = root.rstrip("/") if root != "/" else root
        self.fs = filesystem
        self.base = self.root
        if filesystem is None and is_uri(root):
            self.fs, self.base = pafs.FileSystem.from_uri(root)
        elif filesystem is None:
            self.base = os.path.abspath(os.path.expanduser(_local(root)))

    @property
    def is_local(self) -> bool:
        return self.fs is None

    def display(self, *parts: str) -> str:
        """The path or URI of ``parts`` under the root, as a user would write it."""
        if self.fs is not None and is_uri(self.root):
            return "/".join([self.root, *parts])
        return os.path.join(self.base, *parts)

    def path(self, *parts: str) -> str:
        """The path of ``parts`` on the store's filesystem (local path, or pyarrow's path)."""
        if self.fs is not None:
            return "/".join([self.base, *parts])
        return os.path.join(self.base, *parts)

    def is_dir(self, *parts: str) -> bool:
        if self.fs is None:
            return os.path.isdir(self.path(*parts))
        return bool(self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory)

    def exists(self, *parts: str) -> bool:
        if self.fs is None:
            return os.path.exists(self.path(*parts))
        return bool(self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound)

    def read_text(self, *parts: str) -> str:
        """Raises: FileNotFoundError / OSError when it cannot be read; UnicodeDecodeError."""
        if self.fs is None:
            with open(self.path(*parts), encoding="utf-8") as f:
                return f.read()
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return bytes(f.read()).decode("utf-8")

    def read_bytes(self, *parts: str) -> bytes:
        """Raises: FileNotFoundError / OSError when it cannot be read."""
        if self.fs is None:
            with open(self.path(*parts), "rb") as f:
                return f.read()
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return bytes(f.read())

    def read_json(self, *parts: str) -> Any | None:
        """The parsed JSON file, or None when it is missing, unreadable or not JSON."""
        try:
            return json.loads(self.read_text(*parts))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def list_names(self, *parts: str) -> list[str]:
        """Names of the files and directories directly under ``parts`` (sorted; [] if missing)."""
        if self.fs is None:
            p = self.path(*parts)
            return sorted(os.listdir(p)) if os.path.isdir(p) else []
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(sel))

    def remove_stale_temps(self, names: Sequence[str], max_age_s: float = STALE_TEMP_S) -> None:
        """Delete temp files a killed writer left beside ``names`` (local storage only).

        Only old ones: a young temp file may belong to a writer at work right now.
        """
        if self.fs is not None or not os.path.isdir(self.base):
            return
        now = time.time()
        for entry in os.listdir(self.base):
            if not (entry.endswith(".tmp") and any(entry.startswith(f".{n}.") for n in names)):
                continue
            path = os.path.join(self.base, entry)
            # FileNotFoundError: its writer finished, or another publisher removed it.
            with contextlib.suppress(FileNotFoundError):
                if now - os.path.getmtime(path) > max_age_s:
                    os.unlink(path)

    def write_atomic(self, rel: str, chunks: Iterable[bytes]) -> str:
        """Write ``chunks`` to ``rel`` (``/``-separated) so readers see the old or the new file.

        Returns:
            The written file's path or URI.

        Raises:
            Exception: whatever producing or writing the chunks raised; the old file is kept and
                no temp file is left behind.
        """
        target = self.path(*rel.split("/"))
        if self.fs is not None:
            data = b"".join(chunks)  # produce everything first: a failure uploads nothing
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(target) as out:
                out.write(data)
            return self.display(*rel.split("/"))
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(target) + ".", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp creates 0600; files on team storage are meant to be read by the team.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return target

    def move_dir(self, src: str, dst: str) -> None:
        """Move the directory ``src`` to ``dst`` (both relative, '/'-separated; ``dst`` must not
        exist). Cloud storage has no rename of a directory: a copy, then a delete.

        Raises:
            OSError: it cannot be moved.
        """
        if self.fs is None:
            target = self.path(*dst.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(self.path(*src.split("/")), target)
            return
        source, target = self.path(*src.split("/")), self.path(*dst.split("/"))
        self.fs.create_dir(target, recursive=True)
        pafs.copy_files(
            source,
            target,
            source_filesystem=self.fs,
            destination_filesystem=self.fs,
        )
        self.fs.delete_dir(source)

    def write_json(self, rel: str, obj: Any) -> str:
        """``write_atomic`` of ``obj`` as indented JSON."""
        return self.write_atomic(rel, [json_text(obj).encode("utf-8")])


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> str:
    """Atomically replace the local or cloud file ``path`` with the concatenated ``chunks``.

    Raises:
        Exception: whatever producing or writing the chunks raised; the old file stays intact.
    """
    p = str(path)
    if is_uri(p):
        parent, _, name = p.rstrip("/").rpartition("/")
        return Store(parent).write_atomic(name, chunks)
    p = os.path.abspath(os.path.expanduser(_local(p)))
    return Store(os.path.dirname(p)).write_atomic(os.path.basename(p), chunks)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> str:
    """``atomic_write`` of ``obj`` as JSON."""
    return atomic_write(path, [json_text(obj, indent).encode("utf-8")])


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The reports of a run's ``metrics.jsonl`` (a file, or the run directory holding it).

    A line cut short by a killed writer, or one that is not a JSON object, is skipped; a missing
    file reads as no reports.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    out: list[dict[str, Any]] = []
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


# --------------------------------------------------------------------------- the trial record


class RecordError(ValueError):
    """A trial record that cannot be used (names the file and the field)."""


def _num(v: Any) -> float | None:
    return float(v) if is_finite_number(v) else None


def _int(v: Any) -> int | None:
    return int(v) if is_finite_number(v) else None


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


@dataclass
class TrialRecord:
    """One finished trial: ``<search dir>/trials/<trial_id>.json``.

    Written once by the search (the trial's driver, or the search driver for a trial stopped by
    the scheduler or crashed), never changed afterwards except for Tune's view of its timeline;
    read by ``--resume`` (a finished trial is not trained again) and by the leaderboard.
    """

    trial_id: str
    status: TrialStatus
    search: str | None = None
    reason: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    method: str | None = None
    lora_rank: int | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    objective_value: float | None = None
    proxy: float | None = None
    final_loss: float | None = None
    num_unloads: int | None = None
    # Effective rank of the backbone's change per sampled layer (or one number).
    delta_effective_rank: Any = None
    wall_time_s: float | None = None
    accelerator_hours: float | None = None
    checkpoint_path: str | None = None
    model_path: str | None = None
    started_at: Any = None
    ended_at: Any = None
    loss_curve: list[list[float]] = field(default_factory=list)
    diverged_step: int | None = None
    run_dir: str | None = None
    # Wall-clock marks of the trial's life (benchmarks/search_overhead.py reads them).
    timeline: dict[str, Any] | None = None
    # Times the trial's training was started again after losing a worker, a node or its own
    # actor (search.max_retries), each with what was lost.
    retries: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    # The run's first merge-error warning (merge.MERGE_ERROR_WARN_THRESHOLD), naming
    # plora.merge_rounding; None when every unload stayed under the threshold.
    merge_warning: str | None = None
    # A pbt_unload trial's history, one entry per stage whose settings were set (its start, and
    # each fork at an unload): ``lineage_entry``'s fields. Empty for every other scheduler.
    lineage: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "trial_id": self.trial_id,
            "search": self.search,
            "status": self.status,
            "reason": self.reason,
            "params": self.params,
            "config": self.config,
            "method": self.method,
            "lora_rank": self.lora_rank,
            "objectives": self.objectives,
            "objective_value": self.objective_value,
            "proxy": self.proxy,
            "final_loss": self.final_loss,
            "num_unloads": self.num_unloads,
            "delta_effective_rank": self.delta_effective_rank,
            "wall_time_s": self.wall_time_s,
            "accelerator_hours": self.accelerator_hours,
            "checkpoint_path": self.checkpoint_path,
            "model_path": self.model_path,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "loss_curve": self.loss_curve,
            "diverged_step": self.diverged_step,
            "run_dir": self.run_dir,
        }
        if self.timeline is not None:
            out["timeline"] = self.timeline
        if self.retries:
            out["retries"] = self.retries
            out["retry_reasons"] = self.retry_reasons
        if self.merge_warning is not None:
            out["merge_warning"] = self.merge_warning
        if self.lineage:
            out["lineage"] = self.lineage
        return out

    @classmethod
    def from_dict(cls, rec: Any, source: str) -> TrialRecord:
        """Validate a parsed record; unusable optional values (a NaN, a wrong type) read as None.

        Raises:
            RecordError: naming ``source`` and the field, when the record is not usable at all.
        """
        if not isinstance(rec, Mapping):
            raise RecordError(
                f"{source}: expected a JSON object (trial record), found {type(rec).__name__}"
            )
        tid = rec.get("trial_id")
        if not isinstance(tid, (str, int)) or isinstance(tid, bool) or str(tid) == "":
            raise RecordError(f"{source}: trial_id: expected a non-empty string, found {tid!r}")
        status = rec.get("status")
        if status not in TERMINAL_STATUSES:
            raise RecordError(
                f"{source}: status: expected one of {', '.join(TERMINAL_STATUSES)}, "
                f"found {status!r}"
            )
        objectives = rec.get("objectives") or {}
        if not isinstance(objectives, Mapping):
            raise RecordError(
                f"{source}: objectives: expected an object of metric: number, found {objectives!r}"
            )
        params = rec.get("params") or {}
        if not isinstance(params, Mapping):
            raise RecordError(
                f"{source}: params: expected an object of dotted.key: value, found {params!r}"
            )
        config = rec.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise RecordError(
                f"{source}: config: expected a run-config object, found {type(config).__name__}"
            )
        curve = [
            [float(p[0]), float(p[1])]
            for p in rec.get("loss_curve") or []
            if isinstance(p, (list, tuple))
            and len(p) == 2
            and is_finite_number(p[0])
            and is_finite_number(p[1])
        ]
        method = rec.get("method") or (config or {}).get("method")
        lora_rank = rec.get("lora_rank")
        if lora_rank is None and isinstance(config, Mapping):
            lora_rank = (config.get("lora") or {}).get("rank")
        timeline = rec.get("timeline")
        reasons = rec.get("retry_reasons")
        lineage = rec.get("lineage")
        return cls(
            trial_id=str(tid),
            status=status,
            search=_opt_str(rec.get("search")),
            reason=_opt_str(rec.get("reason")),
            params=dict(params),
            config=dict(config) if config is not None else None,
            method=_opt_str(method),
            lora_rank=_int(lora_rank) if method != "full" else None,
            objectives={str(k): float(v) for k, v in objectives.items() if is_finite_number(v)},
            objective_value=_num(rec.get("objective_value")),
            proxy=_num(rec.get("proxy")),
            final_loss=_num(rec.get("final_loss")),
            num_unloads=_int(rec.get("num_unloads")),
            delta_effective_rank=rec.get("delta_effective_rank"),
            wall_time_s=_num(rec.get("wall_time_s")),
            accelerator_hours=_num(rec.get("accelerator_hours")),
            checkpoint_path=_opt_str(rec.get("checkpoint_path")),
            model_path=_opt_str(rec.get("model_path")),
            started_at=rec.get("started_at"),
            ended_at=rec.get("ended_at"),
            loss_curve=curve,
            diverged_step=_int(rec.get("diverged_step")),
            run_dir=_opt_str(rec.get("run_dir")),
            timeline=dict(timeline) if isinstance(timeline, Mapping) else None,
            retries=_int(rec.get("retries")) or 0,
            retry_reasons=[str(r) for r in reasons] if isinstance(reasons, list) else [],
            merge_warning=_opt_str(rec.get("merge_warning")),
            lineage=[dict(e) for e in lineage if isinstance(e, Mapping)]
            if isinstance(lineage, list)
            else [],
        )


def read_records(store: Store, problems: list[str] | None = None) -> list[TrialRecord]:
    """Every usable record under ``<store>/trials/``, in file-name order.

    A record that cannot be used is skipped (a half-written file of a crashed writer must not take
    a resume or a board down) and, when ``problems`` is given, named there.
    """
    out = []
    for fname in store.list_names("trials"):
        if not fname.endswith(".json"):
            continue  # temp files of an atomic write in progress, editor backups
        src = store.display("trials", fname)
        try:
            out.append(TrialRecord.from_dict(json.loads(store.read_text("trials", fname)), src))
        except OSError as exc:
            if problems is not None:
                problems.append(f"{src}: skipped, cannot be read ({exc})")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if problems is not None:
                problems.append(f"{src}: skipped, not valid JSON ({exc})")
        except RecordError as exc:
            if problems is not None:
                problems.append(f"{exc} (skipped)")
    return out


# --------------------------------------------------------------------------- the search directory


class SearchDir:
    """The search directory ``<storage>/<name>/`` on a local path or a cloud URI.

    ``search.json`` is written when the search starts; ``trials/<trial_id>.json`` once per
    finished trial (atomically: readers never see half a file).
    """

    def __init__(self, storage: str, name: str) -> None:
        self.uri = f"{storage.rstrip('/')}/{name}"
        self.is_local = not is_uri(storage)
        if self.is_local:
            self.path = os.path.abspath(os.path.expanduser(_local(self.uri)))
            self.uri = self.path
        self.store = Store(self.uri)

    def write_json(self, rel: str, obj: Any) -> None:
        self.store.write_json(rel, obj)

    def read_json(self, rel: str) -> Any | None:
        return self.store.read_json(*rel.split("/"))

    def exists(self) -> bool:
        return self.store.exists("search.json")

    def trial_record(self, trial_id: str) -> TrialRecord | None:
        """The finished trial's record, or None when it has none (or an unusable one)."""
        raw = self.read_json(f"trials/{trial_id}.json")
        try:
            return TrialRecord.from_dict(raw, f"trials/{trial_id}.json")
        except RecordError:
            return None

    def write_record(self, rec: TrialRecord) -> None:
        self.write_json(f"trials/{rec.trial_id}.json", rec.to_dict())

    def records(self) -> list[TrialRecord]:
        """Every usable finished-trial record, oldest first."""
        return sorted(read_records(self.store), key=lambda r: (str(r.ended_at or ""), r.trial_id))

    def run_dir(self, trial_id: str) -> str:
        """Where a trial's trainer writes metrics, checkpoints and the exported model on this
        node. Local storage: inside the search directory; cloud storage: this node's scratch
        directory, carried to and from ``run_uri`` by ``plora_ray.run_sync``."""
        if self.is_local:
            return os.path.join(self.path, "runs", trial_id)
        return os.path.join(self.scratch_dir(), trial_id)

    def run_uri(self, trial_id: str) -> str:
        """The trial's run directory as records and the leaderboard name it: in the storage
        (``<search>/runs/<trial_id>``; the same as ``run_dir`` on local storage)."""
        return f"{self.uri}/runs/{trial_id}" if not self.is_local else self.run_dir(trial_id)

    def scratch_dir(self) -> str:
        """A local directory for a cloud search's files that need a real filesystem."""
        return scratch_dir(self.uri)


def scratch_dir(search_uri: str) -> str:
    """This node's scratch directory of the cloud search ``search_uri``: under ``PLORA_SCRATCH``
    as the calling process sees it (each node may set its own), else ``<tmp>/plora-ray``."""
    base = os.environ.get("PLORA_SCRATCH", os.path.join(tempfile.gettempdir(), "plora-ray"))
    return os.path.join(base, search_uri.split("://", 1)[1].replace("/", "_"))
