"""Search integrity: one driver per search, a resume that refuses a changed search, checkpoint
files that cannot run code, and ``--set`` values that cannot either.

Everything here happens before Ray starts (the refusals are the point), so the tests are quick;
the second driver is a real ``plora-ray search --resume`` process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from plora_ray.checkpoint import capture_rng
from plora_ray.checkpoint_load import (
    UnsafeCheckpointError,
    check_deepspeed_checkpoint,
    load_pickled_state,
)
from plora_ray.config import ConfigError
from plora_ray.search import run_search
from plora_ray.search_lock import LOCK_FILE, SearchLock, read_lock
from plora_ray.search_resume import STARTED_WITH_KEY, check_resume, started_config
from plora_ray.search_space import load_search_space
from plora_ray.store import SearchDir

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
CLI = [sys.executable, "-m", "plora_ray.cli"]


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, cwd=REPO, **kw
    )


class WritesMarker:
    """A pickled object whose unpickling would create a file (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------- checkpoint files


def test_a_checkpoint_file_carrying_a_pickled_object_is_refused_without_running_it(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "plora_state.pt"
    torch.save({"num_unloads": 1, "evil": WritesMarker(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        load_pickled_state(path)
    assert not marker.exists()
    # The same file inside DeepSpeed's part of a checkpoint (DeepSpeed itself unpickles freely).
    ds = tmp_path / "deepspeed" / "engine"
    ds.mkdir(parents=True)
    shutil.copy(path, ds / "mp_rank_00_model_states.pt")
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")
    assert not marker.exists()


def test_the_runs_own_checkpoint_files_load_with_weights_only(tmp_path: Path) -> None:
    rng = capture_rng()
    torch.save(rng, tmp_path / "rng_rank0.pt")
    back = load_pickled_state(tmp_path / "rng_rank0.pt")
    assert np.array_equal(back["numpy"][1], rng["numpy"][1])
    assert torch.equal(back["torch"], rng["torch"])
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": None}
    blob["scheduler"] = sched.state_dict()
    torch.save(blob, tmp_path / "trainable.pt")
    assert load_pickled_state(tmp_path / "trainable.pt")["optimizer"]["state"]


def test_no_module_unpickles_checkpoints_with_weights_only_false() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "plora_ray").rglob("*.py")
        if re.search(r"torch\.load\([^)]*weights_only=False", p.read_text())
    ]
    assert offenders == []


# --------------------------------------------------------------------------- --set


def test_a_python_tag_in_set_ends_in_a_message_not_a_traceback(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    out = _cli(
        "search",
        str(SMOKE),
        "--storage",
        str(tmp_path / "st"),
        "--set",
        f'seed=!!python/object/apply:os.system ["touch {marker}"]',
    )
    assert out.returncode == 2, out.stderr
    assert "override seed: expected a YAML value" in out.stderr
    assert "Traceback" not in out.stderr and not marker.exists()


# --------------------------------------------------------------------------- one driver


def _stored_search(tmp_path: Path, name: str = "s") -> tuple[Path, SearchDir]:
    """A search directory as a started search leaves it (search.json with its config)."""
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text(SMOKE.read_text())
    sdir = SearchDir(str(tmp_path / "st"), name)
    space = load_search_space(str(yaml_file))
    sdir.write_json("search.json", {"name": name, **started_config(space)})
    return yaml_file, sdir


def test_a_second_driver_is_refused_naming_the_running_one(tmp_path: Path) -> None:
    yaml_file, sdir = _stored_search(tmp_path)
    with SearchLock(sdir) as first:  # this test process is the first driver
        out = _cli(
            "search", str(yaml_file), "--storage", str(tmp_path / "st"), "--name", "s", "--resume"
        )
        assert out.returncode == 2, out.stderr
        assert "expected no other driver on this search" in out.stderr
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since" in out.stderr
        assert "Traceback" not in out.stderr
        held = read_lock(sdir.store)
        assert held is not None and held.token == first.me.token  # untouched by the refusal
    assert not (Path(sdir.path) / LOCK_FILE).exists()  # released


def _write_lock(sdir: SearchDir, **kw: Any) -> None:
    now = time.time()
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now}
    lock.update({"heartbeat_at": now, "token": "theirs"}, **kw)
    (Path(sdir.path) / LOCK_FILE).write_text(json.dumps(lock))


def test_a_stale_lock_of_a_dead_driver_is_taken_over(tmp_path: Path) -> None:
    _, sdir = _stored_search(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_out())
    _write_lock(sdir, pid=int(dead.stdout))  # same host, pid gone: a killed driver
    with SearchLock(sdir) as lock:
        held = read_lock(sdir.store)
        assert held is not None and held.token == lock.me.token


def test_a_lock_with_an_old_heartbeat_is_taken_over_and_a_live_one_is_not(
    tmp_path: Path,
) -> None:
    _, sdir = _stored_search(tmp_path)
    _write_lock(sdir, host="elsewhere", heartbeat_at=time.time() - 3600)  # its machine died
    with SearchLock(sdir):
        pass
    _write_lock(sdir, host="elsewhere")  # a live driver on another machine
    with pytest.raises(ConfigError, match="host elsewhere"):
        SearchLock(sdir).acquire()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr("plora_ray.search_lock.HEARTBEAT_S", 0.05)
    _, sdir = _stored_search(tmp_path)
    with SearchLock(sdir) as lock:
        first = read_lock(sdir.store)
        time.sleep(0.5)
        later = read_lock(sdir.store)
        assert first is not None and later is not None and later.token == lock.me.token
        assert later.heartbeat_at > first.heartbeat_at


def _out() -> dict[str, Any]:
    return {"capture_output": True, "text": True, "timeout": 60}


# --------------------------------------------------------------------------- resume


def test_resume_of_an_edited_search_is_refused_with_a_diff(tmp_path: Path) -> None:
    yaml_file, sdir = _stored_search(tmp_path)
    text = yaml_file.read_text()
    assert "alpha: 16" in text
    yaml_file.write_text(text.replace("alpha: 16", "alpha: 32"))
    with pytest.raises(ConfigError) as err:
        run_search(str(yaml_file), storage=str(tmp_path / "st"), name="s", resume=True)
    assert "lora.alpha: 16 -> 32" in str(err.value)
    assert "1 changed key(s)" in str(err.value)
    # --set counts as part of the search: the original file with a new --set is refused too.
    yaml_file.write_text(text)
    with pytest.raises(ConfigError, match="search.num_samples: 6 -> 5"):
        run_search(
            str(yaml_file),
            storage=str(tmp_path / "st"),
            name="s",
            resume=True,
            overrides={"search.num_samples": 5},
        )
    assert not (Path(sdir.path) / LOCK_FILE).exists()  # refused before the lock


def test_resume_of_the_same_search_passes_and_an_old_search_gets_a_warning(
    tmp_path: Path, capsys: Any
) -> None:
    yaml_file, sdir = _stored_search(tmp_path)
    check_resume(sdir, load_search_space(str(yaml_file)), str(yaml_file))
    assert capsys.readouterr().err == ""
    meta = sdir.read_json("search.json")
    del meta[STARTED_WITH_KEY]
    sdir.write_json("search.json", meta)
    check_resume(sdir, load_search_space(str(yaml_file)), str(yaml_file))
    assert "does not record the config the search started with" in capsys.readouterr().err
