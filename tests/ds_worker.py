"""One rank of a multi-config DeepSpeed run for tests/test_engine.py (not collected by pytest).

Usage (one process per rank, env RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set):
    python tests/ds_worker.py CASES.json OUT_DIR

For every case in CASES.json the ranks build a real DeepSpeed engine (``plora_ray.engine``) on a
seeded tiny LLaMA with peft LoRA, train ``steps`` optimizer steps with PLoRA unloads
(``plora_ray.plora.PLoRA`` through ``DeepSpeedParamAccess``), and rank 0 then runs the plain-torch
reference of the same schedule (same seed, data, global batch split into the same micro batches)
and writes ``OUT_DIR/<name>.json``: the relative errors between the two runs' LoRA parameters
(fp32 masters), backbone weights, Adam moments and step counts. Looping over cases in one launch
pays DeepSpeed's import and the process-group setup once.

A case is ``{"name", "stage", "bf16", "momentum", "module_only"?, "probe_undo"?,
"probe_grad_accum"?, "gas"?, "persistent"?, "offload_optimizer"?, "offload_param"?}``. ZeRO-3
cases partition every parameter (``stage3_param_persistence_threshold: 0``) unless
``persistent`` keeps DeepSpeed's default, under which this tiny model's parameters all stay
whole on every rank ("persistent").
``module_only`` swaps in an access that writes trainable values into the module only (not the
master copy): the negative control, which must NOT match the reference.
``probe_grad_accum`` compares one optimizer step's accumulated gradient over ``gas`` micro
batches with the fp32 sum of the micro batches' own gradients.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from plora_ray.config import RunConfig, config_from_dict
from plora_ray.lr_schedule import make_lr_scheduler
from plora_ray.model import load_model
from plora_ray.plora import PLoRA, attach_lora

VOCAB, SEQ, MICRO, GAS = 64, 8, 2, 2
STEPS, UNLOAD_EVERY = 5, 2  # unloads after steps 2 and 4, then one more step


def case_config(case: dict[str, Any], world: int) -> RunConfig:
    bf16 = bool(case["bf16"])
    return config_from_dict(
        {
            "seed": 3,
            "model": {
                "tiny": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                },
                "dtype": "bfloat16" if bf16 else "float32",
            },
            "lora": {"rank": 2, "alpha": 4.0},
            "plora": {
                "unload_every": UNLOAD_EVERY,
                "unload_unit": "steps",
                "momentum": case["momentum"],
                "rank_sample_layers": 0,
            },
            # bf16: eps comparable to the gradients makes Adam's update smooth in the gradient. With
            # eps=1e-8 the first step after a reset moves each element by ±lr by the sign of its
            # gradient, so bf16 rounding of the all-reduce flips near-zero elements by 2·lr: a real
            # but uninformative difference. fp32 keeps the paper's eps (matches to ~1e-6 anyway).
            # warmup_restart makes the LR restart at each unload observable.
            "optim": {
                "lr": 0.1 if bf16 else 0.01,
                "eps": 1e-2 if bf16 else 1e-8,
                "schedule": "warmup_restart",
                "warmup_steps": 2,
                "grad_clip": 1.0,
            },
            "batch": {"global_batch": MICRO * case.get("gas", GAS) * world, "micro_batch": MICRO},
            "resources": {"num_workers": world},
            "deepspeed": {
                "zero_stage": case["stage"],
                "bf16": bf16,
                "offload_optimizer": bool(case.get("offload_optimizer", False)),
                "offload_param": bool(case.get("offload_param", False)),
            },
        }
    )


def build_model(cfg: RunConfig) -> torch.nn.Module:
    model = load_model(cfg.model, seed=cfg.seed, vocab_size=VOCAB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)  # peft's kaiming init of A draws from the global RNG
        model = attach_lora(model, cfg.lora)
    if cfg.deepspeed.bf16:
        # What DeepSpeed's bf16 mode does to the module (adapters included); the fp32 masters
        # are then copies of these bf16 values in both runs.
        model = model.to(torch.bfloat16)
    return model


def batches(world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (STEPS * world * GAS * MICRO, SEQ), generator=g)


def micro_batch(data: torch.Tensor, step: int, micro: int, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``micro``-th micro batch of optimizer step ``step``."""
    start = step * world * GAS * MICRO + (micro * world + rank) * MICRO
    return data[start : start + MICRO]


# --------------------------------------------------------------------------- the DeepSpeed run


class ModuleOnlyAccess:
    """Negative control: trainable writes go to the module only, never the fp32 master."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write_trainable(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        self.inner._write_module(p, value)


def snapshot(model: torch.nn.Module, access: Any) -> dict[str, torch.Tensor]:
    """Trainable fp32 values + Adam state (via ``access``) and every backbone weight."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = access.read_trainable(p).cpu()
            state = access.read_optimizer_state(p)
            out[name + "#exp_avg"] = state["exp_avg"].cpu()
            out[name + "#exp_avg_sq"] = state["exp_avg_sq"].cpu()
            out[name + "#step"] = torch.tensor(float(state["step"]))
        else:
            out[name] = access.read_frozen(p).float().cpu().clone()
    return out


def run_deepspeed(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    from plora_ray.engine import DeepSpeedParamAccess, build_engine, gather_full_state_dict

    cfg = case_config(case, world)
    model = build_model(cfg)
    # Tiny parameters would otherwise stay whole ("persistent") under ZeRO-3; 0 partitions all.
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    engine, _, scheduler = build_engine(
        model,
        cfg,
        world,
        stage_length_steps=UNLOAD_EVERY,
        overrides=overrides if case["stage"] == 3 and not case.get("persistent") else None,
    )
    access: Any = DeepSpeedParamAccess(engine)
    if case.get("module_only"):
        access = ModuleOnlyAccess(access)
    plora = PLoRA(
        engine.module, cfg.plora, cfg.batch.global_batch, cfg.seed, access, scheduler=scheduler
    )
    info: dict[str, Any] = {
        "gas": engine.gradient_accumulation_steps(),
        "optimizer": type(engine.optimizer).__name__,
    }
    if case["stage"] == 3:
        frozen = next(p for p in engine.module.parameters() if not p.requires_grad)
        info["zero3_local_numel"] = int(frozen.ds_tensor.numel())
        info["zero3_full_numel"] = int(frozen.ds_numel)
        info["zero3_persistent"] = bool(getattr(frozen, "ds_persist", False))
    data = batches(world)
    unloads = 0
    for step in range(STEPS):
        for micro in range(GAS):
            x = micro_batch(data, step, micro, world, rank)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        if plora.due(step + 1, (step + 1) * cfg.batch.global_batch):
            plora.unload(step + 1, (step + 1) * cfg.batch.global_batch)
            unloads += 1
    info["unloads"] = unloads
    info["lr_after"] = [g["lr"] for g in engine.basic_optimizer.param_groups]
    inner = access.inner if isinstance(access, ModuleOnlyAccess) else access
    info["snapshot"] = snapshot(engine.module, inner)
    # The export/checkpoint helper sees the same values as the access (masters, full weights).
    full = gather_full_state_dict(engine, trainable_only=False)
    adapter = gather_full_state_dict(engine, trainable_only=True)
    info["gather_matches_access"] = (
        set(full) == {n for n in info["snapshot"] if "#" not in n}
        and set(adapter) == {n for n, p in engine.module.named_parameters() if p.requires_grad}
        and all(torch.equal(full[n].float(), info["snapshot"][n]) for n in full)
    )
    return info


def probe_undo(case: dict[str, Any], world: int) -> dict[str, float]:
    """The pitfall, shown directly: B := 0 written into the module only is undone by one step."""
    from plora_ray.engine import DeepSpeedParamAccess, build_engine

    cfg = case_config(case, world)
    model = build_model(cfg)
    engine, _, _ = build_engine(model, cfg, world)
    access = DeepSpeedParamAccess(engine)
    data = batches(world)
    rank = int(os.environ.get("RANK", "0"))
    name, B = next((n, p) for n, p in engine.module.named_parameters() if "lora_B" in n)

    def one_step(step: int) -> None:
        for micro in range(GAS):
            x = micro_batch(data, step, micro, world, rank)
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()

    for step in range(STEPS - 1):
        one_step(step)
    before = access.read_trainable(B)
    with access.gathered([B]):
        access._write_module(B, torch.zeros_like(before))  # module only
    with access.gathered([B]):
        zero_in_module = float(B.detach().float().abs().max())
    one_step(STEPS - 1)
    with access.gathered([B]):
        after_module = B.detach().float().clone()
    master = access.read_trainable(B)
    # Had the write stuck, B would be one Adam step (≈ lr per element) away from 0; it is back
    # near its old value instead, i.e. the optimizer copied its untouched master into the module.
    return {
        "param": name,
        "module_abs_max_right_after_write": zero_in_module,
        "old_norm": float(before.norm()),
        "after_step_norm": float(after_module.norm()),
        "module_equals_master_after_step": bool(
            torch.equal(after_module, master.to(B.dtype).float())
        ),
        "after_step_rel_distance_from_old": float((after_module - before).norm() / before.norm()),
    }


def probe_grad_accum(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """One step's accumulated LoRA gradient vs the fp32 sum of its micro batches' gradients.

    Each micro batch's gradient (of loss / gas, in the module's dtype) is caught by a tensor hook
    before DeepSpeed accumulates it; the step's gradient is read at the accumulation boundary,
    before the optimizer step (``safe_get_full_grad``).
    """
    from deepspeed.utils import safe_get_full_grad

    from plora_ray.engine import build_engine

    cfg = case_config(case, world)
    gas = int(case["gas"])
    engine, _, _ = build_engine(build_model(cfg), cfg, world)
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    fp32_sum: dict[str, torch.Tensor] = {}

    def catch(name: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach().to(torch.float64)
            fp32_sum[name] = fp32_sum[name] + g if name in fp32_sum else g

        return hook

    handles = [p.register_hook(catch(n)) for n, p in trainable]
    g = torch.Generator().manual_seed(13)
    step_grad: dict[str, torch.Tensor] = {}
    grad_dtype = ""
    for micro in range(gas):
        x = torch.randint(0, VOCAB, (world * MICRO, SEQ), generator=g)[
            rank * MICRO : (rank + 1) * MICRO
        ]
        engine.backward(engine(input_ids=x, labels=x).loss)
        if micro == gas - 1:
            for n, p in trainable:
                full = safe_get_full_grad(p)
                assert full is not None, n
                grad_dtype = str(full.dtype)
                step_grad[n] = full.detach().to(torch.float64).reshape(fp32_sum[n].shape)
        engine.step()
    for h in handles:
        h.remove()
    got = torch.cat([step_grad[n].flatten() for n, _ in trainable])
    want = torch.cat([fp32_sum[n].flatten() for n, _ in trainable])
    return {
        "optimizer": type(engine.optimizer).__name__,
        "gas": engine.gradient_accumulation_steps(),
        "grad_dtype": grad_dtype,
        "accum_rel_err": float((got - want).norm() / want.norm()),
    }


# --------------------------------------------------------------------------- the torch reference


class MasterCopyAccess:
    """Plain-torch ParamAccess for a bf16 module stepped through fp32 master copies."""

    def __init__(self, optimizer: torch.optim.Optimizer, masters: dict[int, torch.Tensor]) -> None:
        self.optimizer, self.masters = optimizer, masters

    def gathered(self, params: list[torch.nn.Parameter]) -> Any:
        return contextlib.nullcontext()

    def read_trainable(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.masters[id(p)].detach().clone()

    def write_trainable(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.masters[id(p)].copy_(value)
            p.copy_(value.to(p.dtype))

    def read_frozen(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.detach()

    def write_frozen(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            p.copy_(value)

    def reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        for p in params:
            state = self.optimizer.state.get(self.masters[id(p)])
            for value in (state or {}).values():
                if torch.is_tensor(value):
                    value.zero_()

    def read_optimizer_state(self, p: torch.nn.Parameter) -> dict[str, Any]:
        state = self.optimizer.state.get(self.masters[id(p)], {})
        zeros = torch.zeros(p.shape)
        return {
            "exp_avg": state.get("exp_avg", zeros).clone(),
            "exp_avg_sq": state.get("exp_avg_sq", zeros).clone(),
            "step": float(state.get("step", 0)),
        }


def run_reference(case: dict[str, Any], world: int) -> dict[str, torch.Tensor]:
    """Plain torch: torch.optim.AdamW on fp32 masters (the parameters themselves in fp32)."""
    cfg = case_config(case, world)
    model = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    masters = {id(p): p.detach().float().clone().requires_grad_(True) for p in trainable}
    o = cfg.optim
    opt = torch.optim.AdamW(
        [masters[id(p)] for p in trainable],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )
    scheduler = make_lr_scheduler(opt, o, UNLOAD_EVERY)
    access = MasterCopyAccess(opt, masters)
    plora = PLoRA(model, cfg.plora, cfg.batch.global_batch, cfg.seed, access, scheduler=scheduler)
    data = batches(world)
    n_micro = GAS * world
    for step in range(STEPS):
        # The global batch: every rank's micro batches; the mean over all of them is what
        # DeepSpeed's 1/GAS loss scaling plus the all-reduce average over ranks computes. Each
        # rank's micro batches accumulate in fp32 under ZeRO >= 1 (ds_config sets
        # grad_accum_dtype fp32 with bf16) and in the module's dtype at stage 0 (as in each
        # DeepSpeed rank's .grad); ranks are then summed in fp32.
        fp32_accum = case["stage"] >= 1
        grads = {id(p): torch.zeros(p.shape) for p in trainable}
        for rank in range(world):
            for micro in range(GAS):
                x = micro_batch(data, step, micro, world, rank)
                (model(input_ids=x, labels=x).loss / n_micro).backward()
                if fp32_accum:
                    for p in trainable:
                        grads[id(p)] += p.grad.float()
                        p.grad = None
            for p in trainable:
                if p.grad is not None:
                    grads[id(p)] += p.grad.float()
                    p.grad = None
        for p in trainable:
            masters[id(p)].grad = grads[id(p)]
        torch.nn.utils.clip_grad_norm_([masters[id(p)] for p in trainable], o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler.step()
        with torch.no_grad():
            for p in trainable:
                p.copy_(masters[id(p)].to(p.dtype))
        if plora.due(step + 1, (step + 1) * cfg.batch.global_batch):
            plora.unload(step + 1, (step + 1) * cfg.batch.global_batch)
    return snapshot(model, access)


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative Frobenius error per kind (all tensors of a kind concatenated), worst tensor."""
    kinds: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    worst: dict[str, float] = {}
    steps_equal = True
    for key, r in ref.items():
        g = got[key]
        if key.endswith("#step"):
            steps_equal &= bool(torch.equal(g, r))
            continue
        if "#" in key:
            kind = key.split("#")[1]
        elif "lora_A" in key:
            kind = "lora_A"
        elif "lora_B" in key:
            kind = "lora_B"
        elif "base_layer" in key:
            kind = "backbone_targets"  # the frozen W of every LoRA layer: where unloads merge
        else:
            kind = "backbone_other"  # embeddings, norms, LM head: nothing may touch them
        kinds.setdefault(kind, ([], []))
        kinds[kind][0].append(g.flatten().float())
        kinds[kind][1].append(r.flatten().float())
        rel = float((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12))
        worst[kind] = max(worst.get(kind, 0.0), rel)
    rel_err = {}
    for kind, (gs, rs) in kinds.items():
        gg, rr = torch.cat(gs), torch.cat(rs)
        rel_err[kind] = float((gg - rr).norm() / rr.norm().clamp_min(1e-12))
    return {
        "rel_err": rel_err,
        "worst_tensor_rel_err": worst,
        "steps_equal": steps_equal,
        "steps": sorted({float(v) for k, v in ref.items() if k.endswith("#step")}),
    }


def main(argv: list[str]) -> int:
    import deepspeed

    from plora_ray.engine import init_distributed

    cases = json.loads(Path(argv[1]).read_text())
    out_dir = Path(argv[2])
    init_distributed(timeout_s=300)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert deepspeed.comm.get_world_size() == world
    for case in cases:
        t0 = time.perf_counter()
        if case.get("probe_undo"):
            result: dict[str, Any] = probe_undo(case, world)
        elif case.get("probe_grad_accum"):
            result = probe_grad_accum(case, rank, world)
        else:
            info = run_deepspeed(case, rank, world)
            got = info.pop("snapshot")
            result = dict(info)
            if rank == 0:
                result.update(compare(got, run_reference(case, world)))
        result["seconds"] = round(time.perf_counter() - t0, 2)
        if rank == 0:
            (out_dir / f"{case['name']}.json").write_text(json.dumps(result, indent=1))
        deepspeed.comm.barrier()
    deepspeed.comm.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
