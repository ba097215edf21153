"""The storage check on a real two-node loopback cluster: a path one node cannot see is refused
before any trial starts, a path every node sees is accepted.

Both nodes run on this machine and share its file system, so the second node gets a view of its
own through the test-only hook ``PLORA_TEST_NODE_FS_ROOT`` (``plora_ray.storage_check``): it reads
every path under ``node2-root/``. The "shared" storage is mounted there too (a symlink back to the
real directory), the "node-local" one is not; the check itself is the one the search runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.rehearsal import ray_env, two_node_cluster
from plora_ray.storage_check import NODE_FS_ROOT_TEST_ENV

ROOT = Path(__file__).resolve().parents[1]
SMOKE_YAML = ROOT / "search_spaces" / "smoke.yaml"

ACCEPT = """
import sys, ray
ray.init(address=sys.argv[1])
from plora_ray.storage_check import check_storage_visible, storage_views
check_storage_visible(sys.argv[2])
print("accepted by", len(storage_views(sys.argv[3])), "nodes")
"""


@pytest.mark.slow
def test_storage_one_node_cannot_see_is_refused_before_any_trial_and_shared_is_accepted(
    tmp_path: Path,
) -> None:
    view = tmp_path / "node2-root"
    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    mount = view / str(shared).lstrip("/")
    mount.parent.mkdir(parents=True)
    mount.symlink_to(shared)  # the shared file system, mounted at the same path on node 2
    (shared / "probe").write_text("x")
    with two_node_cluster(node_env={NODE_FS_ROOT_TEST_ENV: str(view)}) as cluster:
        env = {**ray_env(), "RAY_ADDRESS": cluster.gcs, "RAY_AUTH_MODE": "token"}
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "plora_ray.cli",
                "search",
                str(SMOKE_YAML),
                "--storage",
                str(local),
                "--name",
                "s",
                "--set",
                "search.num_samples=1",
                "train.max_steps=1",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
        )
        accepted = subprocess.run(
            [sys.executable, "-c", ACCEPT, cluster.gcs, str(shared), str(shared / "probe")],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=600,
        )
    err = refused.stdout + refused.stderr
    assert refused.returncode == 2, err[-3000:]
    assert f"--storage {local}" in err and "cannot see" in err, err[-3000:]
    assert "s3://" in err and "gs://" in err and "shared file system" in err
    assert "Traceback" not in err
    # Refused before any trial: no trial record, no trial run directory, no marker left behind.
    assert not list(local.glob("s/trials/*.json")) and not (local / "s" / "runs").exists()
    assert not list(local.glob(".plora-storage-check-*"))
    # ... and no search.json, so the same command runs once the storage is fixed (no --resume).
    assert not (local / "s" / "search.json").exists()
    assert accepted.returncode == 0, (accepted.stdout + accepted.stderr)[-3000:]
    assert "accepted by 2 nodes" in accepted.stdout
