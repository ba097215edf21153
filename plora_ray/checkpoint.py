"""Checkpoints of a training run and the compact record of the backbone's change.

A checkpoint directory (one per reported checkpoint; Ray Train merges the files every rank wrote
into it) holds:

``state.json``                step, samples/tokens seen, PLoRA state, data position, divergence
                              window, the last unload's metrics (rank 0)
``rng_rank{r}.pt``            Python, NumPy and torch RNG states of rank ``r``
``deepspeed/engine/``         DeepSpeed ``save_checkpoint`` output: trainable weights, fp32 master
                              copies, optimizer and LR-scheduler state, one optimizer partition per
                              rank; frozen weights excluded
``trainable.pt``              the same without DeepSpeed (one worker): trainable weights,
                              optimizer, scheduler
``backbone/unload_NNNN.safetensors``
                              the backbone's change at each unload so far (see below)
``backbone/digest.json``      a sha256 of every backbone weight the unloads changed, to verify the
                              reconstruction on resume

The backbone's change. Under PLoRA the frozen backbone itself changes at every unload, so a
checkpoint must restore it; a full copy is what a 7B model costs (13 GB in bf16) per checkpoint.
But an unload adds ``coef * B @ A`` to each target weight (``coef``: ``plora.merge_coefficient``),
a rank-r matrix. So a checkpoint stores, per unload and target layer, the fp32 factors ``B`` and
``A`` the unload merged (``r * (out + in)`` numbers instead of ``out * in``); resume rebuilds the
deterministic base model and re-applies the unloads in order with the same rounding and the same
generator seeds the unload used, which gives the same bits. Exactness does not rest on that
argument alone: while the unload runs, ``BackboneRecorder`` re-applies a layer's factors to the
weight's old value and compares the result with what the unload wrote; every element that differs
(a different operation order in the merge, say) is stored verbatim as an exception (flat index +
value), and replay applies the exceptions after the factors. The check costs a second merge, so
it runs on every layer at the first unload a recorder sees and, once any exception was found, at
every unload after; otherwise on one layer per unload, in rotation (see ``BackboneRecorder``).
``digest.json`` checks the reconstruction on load, so a difference the check did not see fails
the resume with the weight's name; it never restores other bits silently.

``merge_rounding="from_base"`` (``merge.merge_from_base``) writes W_k = round_nearest(W_0 + Σ_{s<=k}
coef_s·B_s·A_s) from the original weights instead of adding to the old value, so its replay of
unload k is that expression over the factors of unloads 0..k -- the factors the records hold
anyway, no extra storage -- with W_0 from the same source the run used (``base_weights``). The
recorder verifies it the same way and stores what differs as exceptions. Since each from_base
unload rewrites the weight from W_0, a replay needs only each layer's last record: one product
per layer, not one per unload. The PLoRA state's own copy of the factors (``PLoRA.base_factors``)
is not stored twice: ``BackboneRecorder.from_base_factors`` rebuilds it from the records.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plora_ray.merge import merge_from_base
from plora_ray.plora import base_param_name
from plora_ray.store import atomic_write_json

if TYPE_CHECKING:
    pass

BACKBONE_DIR = "backbone"
DIGEST_FILE = "digest.json"
STATE_FILE = "state.json"

# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what ``capture_rng`` returned (CUDA states only when CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- digests and sizes


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (dtype and shape included), for bit-exact comparisons."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- backbone change


@dataclass
class LayerDelta:
    """What one unload added to one backbone weight.

    Attributes:
        name: the weight's name in ``model.named_parameters()``.
        layer_index: the layer's position in ``plora.lora_pairs`` order (it seeds the rounding
            generator of the unload).
        B: fp32 ``(out, r)`` factor as the unload read it (the master copy under DeepSpeed).
        A: fp32 ``(r, in)`` factor.
        coef: the merged fraction times the LoRA scaling: the unload adds ``coef * B @ A``.
        exc_index: flat indices where re-applying the factors does not give the unload's bits.
        exc_value: the unload's values at those indices (the weight's dtype).
        base_name: the weight's name in the base-weights source (``from_base`` only).
    """

    name: str
    layer_index: int
    B: torch.Tensor
    A: torch.Tensor
    coef: float
    exc_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    exc_value: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    base_name: str = ""


@dataclass
class UnloadDelta:
    """The backbone's change at one unload: a ``LayerDelta`` per target weight, in order."""

    index: int
    step: int
    rounding: str
    layers: list[LayerDelta]

    @property
    def num_exceptions(self) -> int:
        return sum(int(d.exc_index.numel()) for d in self.layers)


# (unload index, layer index, device) -> the generator the unload used for that layer's rounding.
GeneratorFactory = Callable[[int, int, Any], torch.Generator]
# (weight in place, fp32 delta, rounding, generator): the add the unload performs.
AddFunction = Callable[[torch.Tensor, torch.Tensor, str, torch.Generator], None]
# Base parameter name -> the original weight W_0 (``merge.safetensors_base_weights``).
BaseWeights = Callable[[str], torch.Tensor]
FROM_BASE = "from_base"


def _apply_exceptions(new: torch.Tensor, delta: LayerDelta) -> torch.Tensor:
    if delta.exc_index.numel():
        new.view(-1)[delta.exc_index.to(new.device)] = delta.exc_value.to(new.device, new.dtype)
    return new


def replay_layer(
    old: torch.Tensor,
    delta: LayerDelta,
    rounding: str,
    generator: torch.Generator,
    add: AddFunction,
) -> torch.Tensor:
    """The weight after one unload, from its value before: factors, rounding, then exceptions.

    Args:
        old: the weight before the unload (not modified).
        delta: that layer's record.
        rounding: the unload's rounding mode (``nearest`` or ``stochastic``).
        generator: a generator in the state the unload's was in for this layer.
        add: the in-place add with rounding the unload used (``merge.add_with_rounding``).
    """
    new = old.detach().clone()
    B, A = delta.B.to(new.device), delta.A.to(new.device)
    # The same expression, in the same order, as the unload's ``coef * (b @ a)``.
    add(new, delta.coef * (B @ A), rounding, generator)
    return _apply_exceptions(new, delta)


def replay_layer_from_base(
    w0: torch.Tensor, deltas: list[LayerDelta], dtype: torch.dtype, device: Any
) -> torch.Tensor:
    """The weight after a ``from_base`` unload: round_nearest(W_0 + Σ coef·B·A), then exceptions.

    Args:
        w0: the layer's original weight (from the run's base-weights source).
        deltas: this layer's records of every unload so far, in order; the last one is the
            unload being replayed (its exceptions are applied).
        dtype: the backbone's dtype.
        device: where the unload computed (the weight's device).
    """
    # coef * B on CPU, as the unload's ``coef * b`` (one fp32 multiply, same bits).
    factors = [(d.coef * d.B, d.A) for d in deltas]
    new = merge_from_base(w0.to(device=device, dtype=torch.float32), factors, dtype)
    return _apply_exceptions(new, deltas[-1])


def save_unload_delta(record: UnloadDelta, directory: str | os.PathLike[str]) -> Path:
    """Write one unload's record as ``unload_NNNN.safetensors`` (factors, exceptions, metadata)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = []
    for i, ld in enumerate(record.layers):
        tensors[f"{i}.B"] = ld.B.detach().to(torch.float32).contiguous()
        tensors[f"{i}.A"] = ld.A.detach().to(torch.float32).contiguous()
        tensors[f"{i}.exc_index"] = ld.exc_index.to(torch.int64).contiguous()
        tensors[f"{i}.exc_value"] = ld.exc_value.contiguous()
        layers_meta.append(
            {
                "name": ld.name,
                "layer_index": ld.layer_index,
                "coef": ld.coef,
                "base_name": ld.base_name,
            }
        )
    meta = {
        "index": record.index,
        "step": record.step,
        "rounding": record.rounding,
        "layers": layers_meta,
    }
    path = d / f"unload_{record.index:04d}.safetensors"
    save_file(tensors, str(path), metadata={"plora_unload": json.dumps(meta)})
    return path


def load_unload_deltas(directory: str | os.PathLike[str]) -> list[UnloadDelta]:
    """Read every ``unload_NNNN.safetensors`` under ``directory``, in unload order.

    Raises:
        ValueError: a file without the unload metadata, or a gap in the unload indices.
    """
    out: list[UnloadDelta] = []
    for path in sorted(Path(directory).glob("unload_*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("plora_unload")
            if raw is None:
                raise ValueError(f"{path}: expected 'plora_unload' metadata, found none")
            meta = json.loads(raw)
            layers = [
                LayerDelta(
                    name=m["name"],
                    layer_index=int(m["layer_index"]),
                    B=fh.get_tensor(f"{i}.B"),
                    A=fh.get_tensor(f"{i}.A"),
                    coef=float(m["coef"]),
                    exc_index=fh.get_tensor(f"{i}.exc_index"),
                    exc_value=fh.get_tensor(f"{i}.exc_value"),
                    base_name=m.get("base_name", ""),
                )
                for i, m in enumerate(meta["layers"])
            ]
        out.append(
            UnloadDelta(
                index=int(meta["index"]),
                step=int(meta["step"]),
                rounding=meta["rounding"],
                layers=layers,
            )
        )
    for expected, rec in enumerate(out):
        if rec.index != expected:
            raise ValueError(
                f"{directory}: expected unload records 0..{len(out) - 1}, found "
                f"{[r.index for r in out]}"
            )
    return out


class BackboneRecorder:
    """A ParamAccess wrapper that records each unload's change of the backbone compactly.

    PLoRA's unload reads and writes parameters only through its ``ParamAccess``; this wrapper
    passes every call through and, around an unload, records per target weight the factors it
    merged plus the exceptions (see the module docstring). Call ``begin_unload`` just before
    ``PLoRA.unload`` and ``end_unload`` right after.

    What the check guarantees. The unload and the replay compute a merge with the same
    functions (``PLoRA.unload`` and ``replay_layer`` form the same fp32 sum; from_base both call
    ``merge.merge_from_base``), so their bits differ only if the code or the device's kernels
    make them differ, which is systematic: it shows in every layer, at every unload. The
    recorder replays and compares every layer at the first unload it sees (a fresh or a resumed
    run), and one layer per later unload (layer ``index mod n``, so each is checked every n
    unloads), recording what differs as exceptions; the first exception switches the check to
    every layer for the rest of the run. So a systematic difference is caught and stored from
    the unload where it appears on, at the cost of one extra merge per unload instead of a
    second merge of every layer; anything the sample missed is caught by ``digest.json`` when a
    checkpoint is restored (a ``ValueError`` naming the weight), never restored as other bits.

    Args:
        inner: the real access (``TorchParamAccess`` or ``DeepSpeedParamAccess``).
        pairs: ``plora.lora_pairs(model)`` (deterministic order).
        names: parameter id -> name in ``model.named_parameters()``.
        generator_for: ``(unload index, layer index, device) -> torch.Generator`` as the unload
            seeds it.
        add: the unload's in-place add with rounding (``merge.add_with_rounding``).
        coef_for: ``pair -> float``, the fraction of ``scaling * B @ A`` an unload merges.
        rounding: the configured merge rounding (``nearest``, ``stochastic`` or ``from_base``).
        base_weights: the source of W_0 the unloads use with ``from_base`` (required then).

    Raises:
        ValueError: ``from_base`` without ``base_weights``.
    """

    def __init__(
        self,
        inner: Any,
        pairs: list[Any],
        names: dict[int, str],
        generator_for: GeneratorFactory,
        add: AddFunction,
        coef_for: Callable[[Any], float],
        rounding: str,
        base_weights: BaseWeights | None = None,
    ) -> None:
        if rounding == FROM_BASE and base_weights is None:
            raise ValueError(
                "BackboneRecorder: expected base_weights (the W_0 source of the "
                "unloads) with rounding 'from_base', found None"
            )
        self.base_weights = base_weights
        self.inner = inner
        self.pairs = pairs
        self.names = names
        self.generator_for = generator_for
        self.add = add
        self.coef_for = coef_for
        self.rounding = rounding
        self.records: list[UnloadDelta] = []
        self._by_param = {id(p.base): i for i, p in enumerate(pairs)}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._layers: list[LayerDelta] = []
        self._index = 0
        self._step = 0
        # Replay-check every layer (the first unload, and every unload after an exception).
        self.check_every_layer = True
        self._exceptions_seen = False

    # -- the ParamAccess protocol, passed through
    def gathered(self, params: list[torch.nn.Parameter]) -> Any:
        return self.inner.gathered(params)

    def read_trainable(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.inner.read_trainable(p)

    def write_trainable(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        self.inner.write_trainable(p, value)

    def read_frozen(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.inner.read_frozen(p)

    def reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        self.inner.reset_optimizer_state(params)

    def __getattr__(self, name: str) -> Any:  # anything else the real access offers
        return getattr(self.inner, name)

    def write_frozen(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        i = self._by_param.get(id(p))
        if self._pending is not None and i is not None:
            self._layers.append(self._record(i, p, value))
        self.inner.write_frozen(p, value)

    # -- recording
    def begin_unload(self, index: int, step: int) -> None:
        """Read the factors the coming unload will merge (full fp32 values)."""
        pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        params = [t for pr in self.pairs for t in (pr.B, pr.A)]
        with self.inner.gathered(params):
            for i, pr in enumerate(self.pairs):
                pending[i] = (
                    self.inner.read_trainable(pr.B).detach().float().cpu().clone(),
                    self.inner.read_trainable(pr.A).detach().float().cpu().clone(),
                )
        self._pending = pending
        self._layers = []
        self._index = index
        self._step = step

    def _record(self, i: int, p: torch.nn.Parameter, value: torch.Tensor) -> LayerDelta:
        assert self._pending is not None
        B, A = self._pending[i]
        pr = self.pairs[i]
        delta = LayerDelta(
            name=self.names[id(p)], layer_index=i, B=B, A=A, coef=float(self.coef_for(pr))
        )
        if self.rounding == FROM_BASE:
            delta.base_name = base_param_name(pr.name)
        if not (self.check_every_layer or i == self._index % len(self.pairs)):
            return delta
        # p still holds the old weight: write_frozen has not run yet. Replay on p's device, as
        # the unload computed there (a CUDA generator draws other bits than a CPU one).
        old = p.detach()
        want = value.detach().to(device=old.device, dtype=old.dtype)
        if self.rounding == FROM_BASE:
            assert self.base_weights is not None
            prior = [ld for rec in self.records for ld in rec.layers if ld.layer_index == i]
            got = replay_layer_from_base(
                self.base_weights(delta.base_name), [*prior, delta], old.dtype, old.device
            )
        else:
            got = replay_layer(
                old, delta, self.rounding, self.generator_for(self._index, i, old.device), self.add
            )
        differ = (
            (
                got.reshape(-1).view(_int_view(got.dtype))
                != want.reshape(-1).view(_int_view(want.dtype))
            )
            .nonzero()
            .reshape(-1)
        )
        delta.exc_index = differ.to(torch.int64).cpu()
        delta.exc_value = want.reshape(-1)[differ].cpu().clone()
        return delta

    def end_unload(self) -> UnloadDelta:
        """Close the record of the unload that just ran.

        Raises:
            RuntimeError: the unload wrote no target weight through this access, so its change
                could not be recorded (the checkpoint would silently restore a stale backbone).
        """
        if len(self._layers) != len(self.pairs):
            raise RuntimeError(
                f"unload {self._index}: expected write_frozen on each of the {len(self.pairs)} "
                f"target weights, recorded {len(self._layers)}; the backbone change cannot be "
                "checkpointed"
            )
        rec = UnloadDelta(
            index=self._index,
            step=self._step,
            rounding=self.rounding,
            layers=sorted(self._layers, key=lambda d: d.layer_index),
        )
        self.records.append(rec)
        self._exceptions_seen = self._exceptions_seen or rec.num_exceptions > 0
        self.check_every_layer = self._exceptions_seen
        self._pending = None
        self._layers = []
        return rec

    def merged_factors(self, names: set[str]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The factors a PLoRA keeps, rebuilt from the records: pair name -> [(coef·B, A), ...].

        ``PLoRA.base_factors`` holds ``(1 - m)·scaling·b`` and ``a`` per unload (fp32) for the
        layers ``PLoRA.factor_layers`` names; the checkpoint stores the factors once, in the
        records, and a resumed run gets them here (``coef * B`` on CPU is the same fp32 multiply
        the unload did, so the same bits).

        Args:
            names: the pair names to rebuild (``PLoRA.factor_layers()``).
        """
        out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for rec in self.records:
            for ld in rec.layers:
                name = self.pairs[ld.layer_index].name
                if name in names:
                    out.setdefault(name, []).append((ld.coef * ld.B, ld.A.clone()))
        return out

    def from_base_factors(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``merged_factors`` of every layer under ``from_base`` (empty otherwise)."""
        if self.rounding != FROM_BASE:
            return {}
        return self.merged_factors({pr.name for pr in self.pairs})


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        torch.empty(0, dtype=dtype).element_size()
    ]


def backbone_digests(model: torch.nn.Module, names: list[str], access: Any) -> dict[str, str]:
    """sha256 of each named (frozen) weight, gathered if partitioned."""
    params = dict(model.named_parameters())
    out: dict[str, str] = {}
    for n in names:
        p = params[n]
        with access.gathered([p]):
            out[n] = tensor_digest(p.detach())
    return out


def replay_backbone(
    model: torch.nn.Module,
    records: list[UnloadDelta],
    access: Any,
    generator_for: GeneratorFactory,
    add: AddFunction,
    digests: dict[str, str] | None = None,
    *,
    base_weights: BaseWeights | None = None,
) -> None:
    """Re-apply recorded unloads, in order, to a freshly built (base) backbone.

    Args:
        model: the model whose backbone is at its base (deterministic) values.
        records: ``load_unload_deltas`` output.
        access: the ParamAccess used to read/write the frozen weights.
        generator_for: ``(unload index, layer index, device) -> generator``, as when recording.
        add: ``merge.add_with_rounding``.
        digests: expected sha256 per weight after the last unload (``backbone/digest.json``).
        base_weights: the run's W_0 source, for ``from_base`` records.

    Raises:
        ValueError: a record names a weight the model lacks, the records mix ``from_base`` with
            another rounding, ``from_base`` records without ``base_weights``, or the result's
            digest differs.
    """
    params = dict(model.named_parameters())
    for rec in records:
        for ld in rec.layers:
            if ld.name not in params:
                raise ValueError(
                    f"backbone record of unload {rec.index}: expected a weight named "
                    f"{ld.name!r} in the model, found none"
                )
    roundings = sorted({rec.rounding for rec in records})
    if FROM_BASE in roundings:
        if len(roundings) > 1:
            raise ValueError(
                f"backbone records: expected one merge rounding, found {roundings} "
                "(from_base cannot follow another rounding)"
            )
        if base_weights is None:
            raise ValueError(
                "backbone records of from_base unloads: expected base_weights (the "
                "W_0 source of the run), found None"
            )
        _replay_from_base(params, records, access, base_weights)
    else:
        for rec in records:
            for ld in rec.layers:
                p = params[ld.name]
                with access.gathered([p]):
                    old = p.detach()
                    new = replay_layer(
                        old,
                        ld,
                        rec.rounding,
                        generator_for(rec.index, ld.layer_index, old.device),
                        add,
                    )
                    access.write_frozen(p, new)
    if digests:
        got = backbone_digests(model, list(digests), access)
        bad = [n for n in digests if got[n] != digests[n]]
        if bad:
            raise ValueError(
                f"backbone reconstruction: expected the checkpoint's weights bit for "
                f"bit, found {len(bad)} weight(s) differing, e.g. {bad[0]!r}"
            )


def _replay_from_base(
    params: dict[str, torch.nn.Parameter],
    records: list[UnloadDelta],
    access: Any,
    base_weights: BaseWeights,
) -> None:
    # Each from_base unload rewrites the weight from W_0, so the last record of each layer
    # (with all factors up to it) gives the final weight: one product per layer.
    by_layer: dict[str, list[LayerDelta]] = {}
    for rec in records:
        for ld in rec.layers:
            by_layer.setdefault(ld.name, []).append(ld)
    for name, deltas in by_layer.items():
        p = params[name]
        with access.gathered([p]):
            old = access.read_frozen(p)
            new = replay_layer_from_base(
                base_weights(deltas[-1].base_name), deltas, old.dtype, old.device
            )
            access.write_frozen(p, new)


def save_backbone(
    records: list[UnloadDelta], digests: dict[str, str], directory: str | os.PathLike[str]
) -> int:
    """Write all unload records and the digests into ``directory``; return the bytes written."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for rec in records:
        save_unload_delta(rec, d)
    (d / DIGEST_FILE).write_text(json.dumps(digests, indent=0, sort_keys=True))
    return dir_bytes(d)


def load_backbone(directory: str | os.PathLike[str]) -> tuple[list[UnloadDelta], dict[str, str]]:
    """Read what ``save_backbone`` wrote (empty when the directory does not exist)."""
    d = Path(directory)
    if not d.is_dir():
        return [], {}
    digests = json.loads((d / DIGEST_FILE).read_text()) if (d / DIGEST_FILE).is_file() else {}
    return load_unload_deltas(d), digests


def full_backbone_bytes(model: torch.nn.Module) -> int:
    """Bytes of a full copy of the model's frozen weights in their dtype (what a naive checkpoint
    of the changing backbone would store)."""
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            numel = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 keeps the full size here
            total += int(numel) * p.element_size()
    return total


# --------------------------------------------------------------------------- state files


def write_state(directory: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint's ``state.json`` (rank 0), atomically.

    Args:
        directory: the checkpoint directory.
        state: step, data position, divergence window, last unload, proxy values (JSON types).
    """
    atomic_write_json(Path(directory) / STATE_FILE, state, indent=1)


def read_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``write_state`` wrote into the checkpoint ``directory``.

    Raises:
        FileNotFoundError: the directory holds no ``state.json``.
    """
    state: dict[str, Any] = json.loads((Path(directory) / STATE_FILE).read_text())
    return state


__all__ = [
    "BackboneRecorder",
    "LayerDelta",
    "UnloadDelta",
    "backbone_digests",
    "capture_rng",
    "dir_bytes",
    "full_backbone_bytes",
    "load_backbone",
    "load_unload_deltas",
    "read_state",
    "replay_backbone",
    "replay_layer",
    "replay_layer_from_base",
    "restore_rng",
    "save_backbone",
    "save_unload_delta",
    "tensor_digest",
    "write_state",
]
