"""Is the search's storage visible from every node? Checked for real before the first trial.

A trial may run on any node, and its record, checkpoints and exported model go under the search's
storage; on a cluster of more than one node a path that only the driver's node sees (its local
disk) loses them. So before any trial starts, ``check_storage_visible`` writes a marker file into
the storage as the driver sees it and reads it back with one zero-CPU task pinned to each alive
node (``NodeAffinitySchedulingStrategy``, not soft): every node must read the same bytes. Cloud
URIs (``s3://``, ``gs://``, ...) are reached through pyarrow from every node and are not checked; a
single-node cluster needs no check.

Test hook (tests only): a node whose Ray was started with ``PLORA_TEST_NODE_FS_ROOT=/some/dir`` in
its environment reads every path under that directory instead of ``/``, which gives one of two
loopback nodes on one machine a file system view of its own (``tests/test_storage_check.py``).
Users never set it.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from plora_ray.config import ConfigError
from plora_ray.store import is_uri

__all__ = ["NODE_FS_ROOT_TEST_ENV", "NodeView", "check_storage_visible", "storage_views"]

# Test-only: a node-specific file system root (see the module docstring).
NODE_FS_ROOT_TEST_ENV = "PLORA_TEST_NODE_FS_ROOT"
MARKER_PREFIX = ".plora-storage-check-"
# A node that cannot run a zero-CPU task in this time counts as not seeing the storage.
READ_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class NodeView:
    """What one node read at the marker's path."""

    node_id: str
    node_ip: str
    hostname: str
    content: str | None  # None: the file was not there (or not readable)
    error: str = ""


@ray.remote(num_cpus=0, max_retries=0)
def _read_marker(path: str) -> tuple[str, str | None, str]:
    """On the node this task is pinned to: (hostname, the marker's text or None, the error)."""
    root = os.environ.get(NODE_FS_ROOT_TEST_ENV, "")
    local = os.path.join(root, path.lstrip("/")) if root else path
    try:
        return socket.gethostname(), Path(local).read_text(), ""
    except OSError as exc:
        return socket.gethostname(), None, f"{type(exc).__name__}: {exc.strerror or exc}"


def storage_views(marker: str) -> list[NodeView]:
    """Read ``marker`` (a path as the driver sees it) on every alive node of the connected Ray."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {
        n["NodeID"]: _read_marker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        ).remote(marker)
        for n in nodes
    }
    views = []
    for n in nodes:
        try:
            host, content, error = ray.get(refs[n["NodeID"]], timeout=READ_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            host, content, error = "?", None, f"the check task failed: {type(exc).__name__}"
        views.append(NodeView(n["NodeID"], n.get("NodeManagerAddress", "?"), host, content, error))
    return views


def check_storage_visible(storage: str, source: str | None = None) -> None:
    """Refuse a storage path that some alive node of the cluster cannot see.

    Call it with Ray connected, before the first trial. Cloud URIs and single-node clusters pass
    without a check; otherwise a marker written here must be read back, byte for byte, by a task
    on every alive node.

    Args:
        storage: the search's storage (a local path or a URI).
        source: the search-space file, named in the error.

    Raises:
        ConfigError: a node does not see the storage (it names the nodes and what to use
            instead), or the driver cannot write the marker into it.
    """
    if is_uri(storage):
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) < 2:
        return
    root = storage.removeprefix("file://")
    token = secrets.token_hex(16)
    marker = os.path.join(root, MARKER_PREFIX + token)
    try:
        os.makedirs(root, exist_ok=True)
        Path(marker).write_text(token)
    except OSError as exc:
        raise ConfigError(
            [f"--storage {storage}: expected a directory the search driver can write, found {exc}"],
            source,
        ) from None
    try:
        views = storage_views(marker)
    finally:
        Path(marker).unlink(missing_ok=True)
    blind = [v for v in views if v.content != token]
    if blind:
        nodes = "; ".join(
            f"node {v.node_ip} ({v.hostname}, {v.node_id[:8]}): "
            + (v.error or "read other content")
            for v in blind
        )
        raise ConfigError(
            [
                f"--storage {storage}: expected storage every node of the {len(views)}-node "
                f"cluster can reach, found a path {len(blind)} node(s) cannot see ({nodes}); "
                "trials running there would lose their records, checkpoints and models. Use a "
                "shared file system path mounted at the same place on every node (NFS, Lustre, "
                "EFS) or cloud storage (s3://bucket/prefix, gs://bucket/prefix) as --storage "
                "(jobs/*.sh: PLORA_STORAGE)"
            ],
            source,
        )
