"""The scan of DeepSpeed's checkpoint files: Enum members pickled by name pass, attribute walks do
not.

Every file here is a real ``torch.save`` zip (or one whose ``data.pkl`` was written opcode by
opcode); the files that would run code are shown to do so with ``torch.load(weights_only=False)``,
which is how DeepSpeed reads them, after the scan has refused them.
"""

from __future__ import annotations

import enum
import importlib
import io
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from plora_ray.checkpoint_load import (
    DEEPSPEED_CHECKPOINT_ENUM_MEMBERS,
    DEEPSPEED_CHECKPOINT_GLOBALS,
    UnsafeCheckpointError,
    _PickleScan,
    _Refused,
    check_deepspeed_checkpoint,
)

OPTIM_FILE = "global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"


class PickledAsGetattr:
    """Unpickles as ``getattr(owner, name)``: how newer Pythons pickle an Enum member by name, and
    the step a crafted file repeats to walk from an allowed class to ``os.system``."""

    def __init__(self, owner: Any, name: Any) -> None:
        self.owner = owner
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (self.owner, self.name))

    def __call__(self, *args: Any) -> Any:  # pickle only saves callables as a REDUCE's function
        raise AssertionError("only pickled")


class PickledAsCall:
    """Unpickles as ``func(*args)``, where ``func`` is itself unpickled (not a global)."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)

    def __call__(self, *args: Any) -> Any:
        raise AssertionError("only pickled")


class RunsSystem:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def save_in_checkpoint(tmp_path: Path, obj: Any, **save_kw: Any) -> Path:
    path = tmp_path / "deepspeed" / OPTIM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, **save_kw)
    return path


def save_pickle_bytes_in_checkpoint(tmp_path: Path, data_pkl: bytes) -> Path:
    """A torch.save zip whose ``data.pkl`` is the given opcodes (what a crafted file would be)."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    path = tmp_path / "deepspeed" / OPTIM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else source.read(info)
            target.writestr(info, data)
    return path


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def test_the_listed_enum_members_are_those_of_the_installed_deepspeed() -> None:
    for dotted, members in DEEPSPEED_CHECKPOINT_ENUM_MEMBERS.items():
        module, _, name = dotted.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, enum.Enum)
        assert dotted in DEEPSPEED_CHECKPOINT_GLOBALS
        assert members == set(cls.__members__)


def test_getattr_is_no_longer_an_allowed_global() -> None:
    assert "builtins.getattr" not in DEEPSPEED_CHECKPOINT_GLOBALS


def test_a_deepspeed_state_with_an_enum_member_pickled_by_name_passes(tmp_path: Path) -> None:
    state = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": PickledAsGetattr(ZeroStageEnum, "gradients"),  # written by Python 3.12+
        "zero_stage_by_value": ZeroStageEnum.optimizer_states,  # written by Python 3.11
        "again": PickledAsGetattr(ZeroStageEnum, "gradients"),  # a memo get of getattr and class
        "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []},
        "single_partition_of_fp32_groups": [torch.ones(4)],
    }
    path = save_in_checkpoint(tmp_path, state)
    assert b"getattr" in data_pkl(path)
    check_deepspeed_checkpoint(tmp_path / "deepspeed")
    loaded = torch.load(path, weights_only=False)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["again"] is ZeroStageEnum.gradients


def test_getattr_of_an_enum_attribute_that_is_not_a_member_is_refused(tmp_path: Path) -> None:
    save_in_checkpoint(tmp_path, {"zero_stage": PickledAsGetattr(ZeroStageEnum, "__init__")})
    with pytest.raises(UnsafeCheckpointError, match=r"optim_states\.pt.*getattr.*'__init__'"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")


def test_getattr_of_an_attribute_of_a_fetched_member_is_refused(tmp_path: Path) -> None:
    member = PickledAsGetattr(ZeroStageEnum, "gradients")
    save_in_checkpoint(tmp_path, {"x": PickledAsGetattr(member, "__class__")})
    with pytest.raises(UnsafeCheckpointError, match=r"getattr\(.*ZeroStageEnum\.gradients"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")


def test_getattr_with_a_name_that_is_not_a_string_constant_is_refused(tmp_path: Path) -> None:
    name = PickledAsGetattr(ZeroStageEnum, "gradients")
    save_in_checkpoint(tmp_path, {"x": PickledAsGetattr(ZeroStageEnum, name)})
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")


def test_getattr_passed_as_a_value_is_refused(tmp_path: Path) -> None:
    save_in_checkpoint(tmp_path, {"hook": getattr})
    with pytest.raises(UnsafeCheckpointError, match="getattr used as a value"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")


def test_an_attribute_walk_from_an_allowed_enum_to_os_system_is_refused_before_it_runs(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker"
    enum_module = PickledAsGetattr(PickledAsGetattr(ZeroStageEnum, "__init__"), "__globals__")
    sys_module = PickledAsCall(PickledAsGetattr(enum_module, "get"), "sys")
    os_module = PickledAsCall(
        PickledAsGetattr(PickledAsGetattr(sys_module, "modules"), "get"), "os"
    )
    payload = PickledAsCall(PickledAsGetattr(os_module, "system"), f"touch {marker}")
    path = save_in_checkpoint(tmp_path, {"zero_stage": payload})
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")
    assert not marker.exists()
    # The file names no global but getattr and ZeroStageEnum, yet DeepSpeed's load would run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_call_of_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    save_in_checkpoint(tmp_path, {"x": RunsSystem(f"touch {marker}")})
    with pytest.raises(UnsafeCheckpointError, match=r"the globals \[.*system"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")
    assert not marker.exists()


def test_filling_in_an_allowed_class_is_refused_before_it_changes_the_class(
    tmp_path: Path,
) -> None:
    # BUILD with a slot state runs setattr(LossScaler, "scan_test_flag", True): a crafted file could
    # overwrite any attribute of an allowed class this way.
    ops = (
        b"\x80\x02"
        + b"cdeepspeed.runtime.fp16.loss_scaler\nLossScaler\n"
        + b"N}X\x0e\x00\x00\x00scan_test_flag\x88s\x86b."
    )
    pickletools.dis(ops, io.StringIO())  # well formed
    path = save_pickle_bytes_in_checkpoint(tmp_path, ops)
    with pytest.raises(UnsafeCheckpointError, match="BUILD filling in .*LossScaler"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")
    assert not hasattr(LossScaler, "scan_test_flag")
    try:
        torch.load(path, weights_only=False)
        assert LossScaler.scan_test_flag is True
    finally:
        if hasattr(LossScaler, "scan_test_flag"):
            delattr(LossScaler, "scan_test_flag")


def test_a_pickle_torch_cannot_scan_is_refused_with_a_message(tmp_path: Path) -> None:
    path = save_in_checkpoint(tmp_path, {"t": torch.zeros(2)}, pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError, match=rf"{re.escape(str(path))}.*cannot scan"):
        check_deepspeed_checkpoint(tmp_path / "deepspeed")


def test_the_opcode_scan_follows_protocol_4_stack_globals_and_memoize() -> None:
    member = PickledAsGetattr(ZeroStageEnum, "gradients")
    by_name = pickle.dumps([member, member, PickledAsGetattr(ZeroStageEnum, "weights")], 4)
    assert b"\x93" in by_name and b"\x94" in by_name  # STACK_GLOBAL, MEMOIZE
    _PickleScan().run(by_name)
    walk = pickle.dumps(PickledAsGetattr(member, "__class__"), protocol=4)
    with pytest.raises(_Refused, match=r"getattr\(.*ZeroStageEnum\.gradients"):
        _PickleScan().run(walk)
