"""Loading a checkpoint's pickled files without letting them run code.

A checkpoint lives in shared storage: whoever can write there could leave a ``.pt`` file whose
pickle calls ``os.system`` on the next resume. So every ``.pt`` file of a checkpoint is read with
``torch.load(weights_only=True)``, which builds only tensors, plain containers and the few types
registered here, and refuses anything else before it is called.

DeepSpeed reads its own files with ``weights_only=False``, so its part of the checkpoint is
checked first, from each file's pickle opcodes alone (nothing of the file is built: the files hold
the whole optimizer state). The check follows the pickle's stack and memo and guarantees that:

- every global the pickle names is one ``weights_only`` allows, one of
  ``DEEPSPEED_CHECKPOINT_GLOBALS`` (plain DeepSpeed state classes) or ``builtins.getattr``;
- only globals are called (REDUCE, NEWOBJ), never an object the pickle built or fetched;
- ``builtins.getattr`` is only called, and only as ``getattr(<Enum class>, <member name>)``
  with the class a global and the name a string constant, the pair listed in
  ``DEEPSPEED_CHECKPOINT_ENUM_MEMBERS``: this is how Python pickles an Enum member by name. Any
  other use is refused, so no chain of attribute lookups (``__init__.__globals__`` ... to
  ``os.system``) can be built;
- only objects the pickle built are filled in (BUILD, SETITEM, APPEND): never a global or an
  Enum member, so loading cannot overwrite a class's or module's attributes.

What it does not guarantee is what ``weights_only=True`` adds on top: the allowed callables still
run with whatever arguments the file gives them (a tensor rebuilt from a storage, a DeepSpeed
state class restored from its attribute dict).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "DEEPSPEED_CHECKPOINT_ENUM_MEMBERS",
    "DEEPSPEED_CHECKPOINT_GLOBALS",
    "UnsafeCheckpointError",
    "check_deepspeed_checkpoint",
    "load_pickled_state",
]

# What the run's own .pt files hold besides tensors and containers: NumPy's RNG state (a uint32
# ndarray in ``rng_rank{r}.pt``). Reconstructing an ndarray runs no user code.
_STATE_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]

# Globals DeepSpeed's checkpoint files name beyond what ``weights_only`` allows anyway (tensors,
# storages, OrderedDict, torch.Size): its ZeRO optimizer states hold these. Plain classes restored
# from their attribute dicts, and an Enum; none runs code of its own when unpickled.
DEEPSPEED_CHECKPOINT_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)

# The Enum classes among those globals, with their member names (aliases included). Depending on
# the Python that wrote the file, a member is pickled by value (``ZeroStageEnum(2)``) or by name
# (``getattr(ZeroStageEnum, 'gradients')``); the second is the only call of getattr the scan lets
# through. Kept static so this module stays free of DeepSpeed; a test compares it with the
# installed DeepSpeed's ``__members__``.
DEEPSPEED_CHECKPOINT_ENUM_MEMBERS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum": frozenset(
            {"disabled", "optimizer_states", "gradients", "weights", "max_stage"}
        ),
    }
)

_GETATTR = "builtins.getattr"

# Opcodes torch.save (pickle protocol 2) never writes and that call or look up code other than
# through the globals followed here (protocol 0/1 instance creation, the copyreg extension
# registry): refused outright.
_REFUSED_OPS = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4"})
# Opcodes that fill in the object below their operands (the first of ``stack_before``).
_FILLING_OPS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_STRING_OPS = frozenset({"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_TUPLE_SIZES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than plain state (it could run code on load)."""


def load_pickled_state(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` of one of the run's own ``.pt`` files, refusing anything that is not data.

    Args:
        path: the file (``plora_state.pt``, ``trainable.pt``, ``rng_rank{r}.pt``).

    Returns:
        What the file holds: tensors, numbers, strings, containers, NumPy arrays.

    Raises:
        UnsafeCheckpointError: the file names a type or function outside that set (a pickled
            object that could run code); nothing of it was built.
        FileNotFoundError: the file is missing.
    """
    try:
        with torch.serialization.safe_globals(_STATE_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(_refusal(path, str(exc).splitlines()[-1])) from None


def _refusal(path: str | os.PathLike[str], found: str) -> str:
    return (
        f"{path}: expected a checkpoint file of tensors and plain values, found {found}; "
        "refusing to load it (a checkpoint that names other objects could run code on resume: "
        "was it written by another program?)"
    )


def check_deepspeed_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Check every ``.pt`` file under a DeepSpeed checkpoint directory before DeepSpeed loads it
    (DeepSpeed itself unpickles with ``weights_only=False``). See the module docstring for what
    the check guarantees.

    Args:
        directory: the checkpoint's ``deepspeed/`` directory.

    Raises:
        UnsafeCheckpointError: a file is not torch's zip format, names a global outside
            ``weights_only``'s and ``DEEPSPEED_CHECKPOINT_GLOBALS``, calls something other than
            a global, uses ``builtins.getattr`` other than to fetch a listed Enum member, or
            fills in a global or an Enum member. Nothing of the file was built.
    """
    for path in sorted(Path(directory).rglob("*.pt")):
        _check_deepspeed_file(path)


def _check_deepspeed_file(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(_refusal(path, "a file that is not torch's zip format"))
    try:
        # Only the pickle's opcodes are read, the way torch.load finds the pickle in the zip.
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with torch.serialization._open_zipfile_reader(str(path)) as archive:
            data = archive.get_record("data.pkl")
    except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError) as exc:
        raise UnsafeCheckpointError(_refusal(path, f"a pickle torch cannot scan ({exc})")) from None
    # getattr is vetted use by use below.
    unknown = sorted(named - DEEPSPEED_CHECKPOINT_GLOBALS - {_GETATTR})
    if unknown:
        raise UnsafeCheckpointError(_refusal(path, f"the globals {unknown}"))
    try:
        _PickleScan().run(data)
    except _Refused as exc:
        raise UnsafeCheckpointError(_refusal(path, f"{exc} in data.pkl")) from None


class _Refused(Exception):
    """What the opcode scan found that it does not allow (the message names it)."""


@dataclass(frozen=True)
class _Item:
    """What the scan knows of one value on the pickle's stack or in its memo."""

    kind: Literal["global", "str", "member", "tuple", "other"]
    text: str = ""  # the global's dotted name, the string constant, or the Enum member
    items: tuple[_Item, ...] = ()  # a tuple's elements


_OTHER = _Item("other")


def _describe(item: _Item) -> str:
    if item.kind == "str":
        return repr(item.text)
    if item.kind == "tuple":
        return "(" + ", ".join(_describe(element) for element in item.items) + ")"
    return item.text or "a built object"


def _global_name(module: str, qualname: str) -> str:
    # The renames pickle applies to protocol 0-2 files (``__builtin__`` is ``builtins``).
    if (module, qualname) in NAME_MAPPING:
        module, qualname = NAME_MAPPING[(module, qualname)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{qualname}"


def _as_value(item: _Item) -> _Item:
    # An item going into a container, an argument tuple, the memo's copies or the result: fine for
    # anything but the getattr function itself, which may only be called (see _PickleScan.call).
    if item.kind == "global" and item.text == _GETATTR:
        raise _Refused("builtins.getattr used as a value (it may only fetch an Enum member)")
    return item


class _PickleScan:
    """Follows a pickle's stack and memo opcode by opcode, building nothing."""

    def __init__(self) -> None:
        self.stack: list[_Item] = []
        self.marks: list[list[_Item]] = []
        self.memo: dict[int, _Item] = {}

    def run(self, data: bytes) -> None:
        try:
            for opcode, arg, pos in pickletools.genops(data):
                try:
                    self.step(opcode, arg)
                except _Refused as exc:
                    raise _Refused(f"{exc} at byte {pos}") from None
        except ValueError as exc:  # genops: a truncated or unknown opcode
            raise _Refused(f"an unreadable pickle ({exc})") from None

    def pop(self, count: int) -> list[_Item]:
        if count > len(self.stack):
            raise _Refused("a malformed pickle (an opcode without its operands)")
        items = self.stack[len(self.stack) - count :]
        del self.stack[len(self.stack) - count :]
        return items

    def pop_mark(self) -> list[_Item]:
        if not self.marks:
            raise _Refused("a malformed pickle (no MARK)")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self) -> _Item:
        if not self.stack:
            raise _Refused("a malformed pickle (an empty stack)")
        return self.stack[-1]

    def step(self, opcode: pickletools.OpcodeInfo, arg: Any) -> None:
        name = opcode.name
        if name in _REFUSED_OPS:
            raise _Refused(f"the opcode {name} (torch.save does not write it)")
        if name == "MARK":
            self.marks.append(self.stack)
            self.stack = []
        elif name == "GLOBAL":
            module, _, qualname = arg.partition(" ")
            self.stack.append(_Item("global", _global_name(module, qualname)))
        elif name == "STACK_GLOBAL":
            module, qualname = self.pop(2)
            if module.kind != "str" or qualname.kind != "str":
                raise _Refused("STACK_GLOBAL of names that are not string constants")
            self.stack.append(_Item("global", _global_name(module.text, qualname.text)))
        elif name in _STRING_OPS:
            self.stack.append(_Item("str", arg))
        elif name in _PUT_OPS:
            self.memo[arg] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in _GET_OPS:
            if arg not in self.memo:
                raise _Refused(f"a malformed pickle (memo {arg} read before it is written)")
            self.stack.append(self.memo[arg])
        elif name == "DUP":
            self.stack.append(self.top())
        elif name == "TUPLE" or name in _TUPLE_SIZES:
            items = self.pop_mark() if name == "TUPLE" else self.pop(_TUPLE_SIZES[name])
            self.stack.append(_Item("tuple", items=tuple(_as_value(item) for item in items)))
        elif name == "REDUCE":
            func, args = self.pop(2)
            self.stack.append(self.call(func, args))
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            cls, *operands = self.pop(len(opcode.stack_before))
            for item in operands:
                _as_value(item)
            self.stack.append(self.call(cls, _OTHER))
        else:
            self.generic(opcode)

    def call(self, func: _Item, args: _Item) -> _Item:
        if func.kind != "global":
            raise _Refused(f"a call of {_describe(func)} (only globals may be called)")
        if func.text != _GETATTR:
            _as_value(args)
            return _OTHER
        # getattr(<Enum class>, <member name>), both constants: the one allowed use.
        if args.kind == "tuple" and len(args.items) == 2:
            owner, attribute = args.items
            members = DEEPSPEED_CHECKPOINT_ENUM_MEMBERS.get(owner.text, frozenset())
            if owner.kind == "global" and attribute.kind == "str" and attribute.text in members:
                return _Item("member", f"{owner.text}.{attribute.text}")
        raise _Refused(
            f"the call getattr{_describe(args)} (getattr may only fetch a member of "
            f"{sorted(DEEPSPEED_CHECKPOINT_ENUM_MEMBERS)} by a constant name)"
        )

    def generic(self, opcode: pickletools.OpcodeInfo) -> None:
        # Any other opcode, from its documented stack effect: it consumes its operands as values
        # and pushes new objects (or, for the filling opcodes, the object it filled in).
        before = opcode.stack_before
        if pickletools.markobject in before:
            sliced = self.pop_mark()
            fixed = self.pop(before.index(pickletools.markobject))
        else:
            sliced, fixed = [], self.pop(len(before))
        filling = opcode.name in _FILLING_OPS
        for item in fixed[1:] + sliced if filling else fixed + sliced:
            _as_value(item)
        if not filling:
            self.stack.extend(_OTHER for _ in opcode.stack_after)
        elif fixed[0].kind == "other":
            self.stack.append(fixed[0])
        else:
            raise _Refused(f"{opcode.name} filling in {_describe(fixed[0])}")
