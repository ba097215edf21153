"""PLoRA core on a real tiny LLaMA with real peft LoRA layers and real torch AdamW (no mocks)."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch

from plora_ray.base_weights import LastReadCache
from plora_ray.config import (
    LLAMA_LINEAR_TARGETS,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PLoRAConfig,
    TinyModelConfig,
)
from plora_ray.lr_schedule import make_lr_scheduler
from plora_ray.merge import round_to_dtype, safetensors_base_weights
from plora_ray.model import load_model
from plora_ray.plora import (
    MERGE_ERROR_WARN_THRESHOLD,
    PLoRA,
    TorchParamAccess,
    attach_lora,
    effective_rank,
    factor_effective_rank,
    lora_pairs,
    unload_due,
)
from plora_ray.recorded_unload import build_recorded_plora, recorded_unload

VOCAB = 256
# One block of hidden 32: the seven targets, real attention and MLP, at a fraction of the cost.
SMALL = TinyModelConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def tiny_lora(
    dtype: str = "float32", rank: int = 8, seed: int = 0, tiny: TinyModelConfig = SMALL
) -> torch.nn.Module:
    model = load_model(ModelConfig(tiny=tiny, dtype=dtype), seed=seed, vocab_size=VOCAB)
    torch.manual_seed(seed)  # peft draws the initial A from the global RNG
    return attach_lora(model, LoraConfig(rank=rank))


def randomise_B(model: torch.nn.Module, scale: float, seed: int = 1) -> None:
    """Give every adapter a non-zero update, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_pairs(model):
            p.B.copy_(torch.randn(p.B.shape, generator=g) * scale)


def tokens(seed: int = 2, batch: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {
        p.name: (
            p.base.detach().float().clone(),
            p.A.detach().float().clone(),
            p.B.detach().float().clone(),
        )
        for p in lora_pairs(model)
    }


# --------------------------------------------------------------------------- attach + bad input


def test_attach_lora_defaults_to_all_seven_llama_linears_and_freezes_backbone() -> None:
    model = tiny_lora(tiny=TinyModelConfig())  # the embedded default: two blocks
    pairs = lora_pairs(model)
    names = {p.name.rsplit(".", 1)[-1] for p in pairs}
    assert names == set(LLAMA_LINEAR_TARGETS)
    assert len(pairs) == 7 * TinyModelConfig().num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.A.shape[0] == 8 and p.scaling == 2.0 for p in pairs)


def test_attach_lora_unknown_target_is_named_under_lora_targets() -> None:
    model = load_model(ModelConfig(tiny=SMALL, dtype="float32"), vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"lora\.targets.*qq_proj"):
        attach_lora(model, LoraConfig(targets=["q_proj", "qq_proj"]))


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [("rank", 0, r"lora\.rank.*found 0"), ("dropout", 1.0, r"lora\.dropout.*found 1\.0")],
)
def test_attach_lora_rejects_bad_lora_settings(field: str, value: object, pattern: str) -> None:
    model = load_model(ModelConfig(tiny=SMALL, dtype="float32"), vocab_size=VOCAB)
    with pytest.raises(ValueError, match=pattern):
        attach_lora(model, LoraConfig(**{field: value}))


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("momentum", 1.0, r"plora\.momentum.*\[0, 1\).*found 1\.0"),
        ("momentum", -0.1, r"plora\.momentum.*found -0\.1"),
        ("unload_every", 0, r"plora\.unload_every.*>= 1.*found 0"),
        ("variant", "paper", r"plora\.variant.*found 'paper'"),
        ("merge_rounding", "up", r"plora\.merge_rounding.*found 'up'"),
    ],
)
def test_plora_rejects_bad_settings_before_any_step(
    field: str, value: object, pattern: str
) -> None:
    model = tiny_lora()
    with pytest.raises(ValueError, match=pattern):
        PLoRA(model, PLoRAConfig(**{field: value}), 24, 0, TorchParamAccess(None))


def test_plora_requires_lora_layers() -> None:
    model = load_model(ModelConfig(tiny=SMALL, dtype="float32"), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="attach_lora"):
        PLoRA(model, PLoRAConfig(), 24, 0, TorchParamAccess(None))


# --------------------------------------------------------------------------- unload semantics


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5])
def test_exact_unload_preserves_function_fp32(momentum: float) -> None:
    model = tiny_lora()
    randomise_B(model, 0.02)
    x = tokens()
    before = logits(model, x)
    with model.disable_adapter():
        base = logits(model, x)
    plora = PLoRA(model, PLoRAConfig(momentum=momentum), 24, 0, TorchParamAccess(None))
    report = plora.unload(1, 24)
    after = logits(model, x)
    assert (before - base).abs().max() > 0.1  # the adapter matters, so preservation means something
    assert torch.allclose(after, before, atol=2e-5, rtol=1e-5)
    assert report.merge_rel_error < 1e-5


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_exact_unload_preserves_function_bf16_within_bf16_noise(rounding: str) -> None:
    """A bf16 backbone cannot hold W + (1-m)ΔW exactly: each weight moves by up to one ulp. The
    honest bound is therefore the bf16 model's own error: after the unload the logits may differ
    from before by at most 3x what the bf16 model already differs from the same weights in fp32,
    while the paper-literal variant (which really changes the function) moves them far more."""
    x = tokens()
    jumps = {}
    for variant in ("exact", "paper_literal"):
        model = tiny_lora("bfloat16", tiny=TinyModelConfig())  # where the bounds were measured
        randomise_B(model, 0.02)
        before = logits(model, x)
        floor = (before - logits(copy.deepcopy(model).float(), x)).abs().max()
        cfg = PLoRAConfig(momentum=0.1, merge_rounding=rounding, variant=variant)
        PLoRA(model, cfg, 24, 0, TorchParamAccess(None)).unload(1, 24)
        jumps[variant] = (logits(model, x) - before).abs().max()
    assert floor > 0
    assert jumps["exact"] <= 3 * floor, (jumps, floor)
    assert jumps["paper_literal"] > 3 * jumps["exact"]


def test_momentum_zero_reinitialises_A_as_peft_and_zeroes_B_seeded() -> None:
    outs = []
    for _ in range(2):
        model = tiny_lora()
        randomise_B(model, 0.02)
        old = snapshot(model)
        PLoRA(model, PLoRAConfig(momentum=0.0), 24, seed=7, access=TorchParamAccess(None)).unload(
            1, 24
        )
        outs.append(snapshot(model))
    for name, (_, a_old, _) in old.items():
        _, a, b = outs[0][name]
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) on (r, in) = U(±1/sqrt(in))
        assert torch.count_nonzero(b) == 0
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
        assert abs(a.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3)
        assert not torch.allclose(a, a_old)
        assert torch.equal(a, outs[1][name][1])  # same seed, same bits (every rank agrees)
    a_by_layer = [v[1] for v in outs[0].values()]
    assert not torch.equal(a_by_layer[0], a_by_layer[1])  # each layer its own generator


def test_exact_variant_merges_one_minus_m_and_adapter_keeps_m_delta() -> None:
    m = 0.3
    model = tiny_lora()
    randomise_B(model, 0.02)
    old = snapshot(model)
    scaling = lora_pairs(model)[0].scaling
    PLoRA(model, PLoRAConfig(momentum=m), 24, 0, TorchParamAccess(None)).unload(1, 24)
    new = snapshot(model)
    for name, (w0, a0, b0) in old.items():
        w1, a1, b1 = new[name]
        delta = scaling * b0 @ a0
        torch.testing.assert_close(w1 - w0, (1 - m) * delta, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(scaling * b1 @ a1, m * delta, atol=1e-7, rtol=1e-5)
        assert torch.equal(a1, a0)  # the documented factorisation: B <- m·B, A unchanged


def test_paper_literal_drops_m_one_minus_m_delta_each_unload() -> None:
    m = 0.3
    model = tiny_lora()
    randomise_B(model, 0.02)
    old = snapshot(model)
    scaling = lora_pairs(model)[0].scaling
    cfg = PLoRAConfig(momentum=m, variant="paper_literal")
    PLoRA(model, cfg, 24, 0, TorchParamAccess(None)).unload(1, 24)
    new = snapshot(model)
    for name, (w0, a0, b0) in old.items():
        w1, a1, b1 = new[name]
        delta = scaling * b0 @ a0
        total_change = (w1 + scaling * b1 @ a1) - (w0 + delta)
        torch.testing.assert_close(total_change, -m * (1 - m) * delta, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(a1, m * a0)


def train_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    n: int,
    seed: int,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    plora: PLoRA | None = None,
    start: int = 0,
    batch: int = 2,
) -> list[float]:
    lrs = []
    for i in range(start, start + n):
        x = tokens(seed=seed + i, batch=batch, length=16)
        model(input_ids=x, labels=x).loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        if plora is not None and plora.due(i + 1, (i + 1) * batch):
            plora.unload(i + 1, (i + 1) * batch)
    return lrs


def test_unload_resets_real_adamw_state_of_lora_params() -> None:
    model = tiny_lora()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, eps=1e-16)
    train_steps(model, opt, 3, seed=10)
    assert all(float(opt.state[p]["step"]) == 3 for p in params)
    assert any(opt.state[p]["exp_avg"].abs().sum() > 0 for p in params)
    PLoRA(model, PLoRAConfig(momentum=0.1), 2, 0, TorchParamAccess(opt)).unload(3, 6)
    for p in params:
        assert float(opt.state[p]["step"]) == 0
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
        assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0
    # The next step is a fresh Adam step: m_hat = g, v_hat = g^2, so each coordinate moves by lr
    # (less only where |g| is near eps); with stale moments the steps would be spread out.
    a = lora_pairs(model)[0].A
    before = a.detach().clone()
    train_steps(model, opt, 1, seed=20)
    step = (a.detach() - before).abs()
    assert ((step - 1e-3).abs() < 2e-5).float().mean() > 0.8


def test_lr_schedule_restarts_at_each_unload() -> None:
    # Stages of 4 steps; cosine: warmup 1 step, then 1 -> 0.1 over the stage's remaining steps.
    model = tiny_lora()
    for schedule, warmup, expected in [
        ("constant", 2, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("warmup_restart", 2, [0.5, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0]),
        ("cosine_restart", 1, [1.0, 1.0, 0.55, 0.1, 1.0, 1.0, 0.55, 0.1]),
    ]:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        optim = OptimConfig(lr=1e-3, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1)
        cfg = PLoRAConfig(unload_every=4, unload_unit="steps", rank_sample_layers=0)
        plora = PLoRA(model, cfg, 2, 0, TorchParamAccess(opt))
        sched = make_lr_scheduler(opt, optim, plora.stage_length_steps)
        plora.scheduler = sched
        lrs = train_steps(model, opt, 8, seed=30, sched=sched, plora=plora)
        assert plora.num_unloads == 2
        assert lrs == pytest.approx([1e-3 * f for f in expected]), schedule


def test_cosine_restart_reaches_min_lr_at_the_end_of_every_sample_based_stage() -> None:
    # Every 50 samples at global batch 24 (not a multiple): unloads after steps 3, 5, 7, 9, i.e.
    # stages of 3, 2, 2, 2 steps; each stage's cosine ends at min_lr_ratio on its own last step.
    model = tiny_lora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optim = OptimConfig(lr=1e-3, schedule="cosine_restart", warmup_steps=0, min_lr_ratio=0.1)
    cfg = PLoRAConfig(unload_every=50, unload_unit="samples", rank_sample_layers=0)
    plora = PLoRA(model, cfg, 24, 0, TorchParamAccess(opt))
    plora.scheduler = make_lr_scheduler(opt, optim, plora.stage_length_steps)
    lrs = train_steps(model, opt, 9, seed=35, sched=plora.scheduler, plora=plora, batch=24)
    assert plora.num_unloads == 4
    expected = [1.0, 0.55, 0.1, 1.0, 0.1, 1.0, 0.1, 1.0, 0.1]
    assert lrs == pytest.approx([1e-3 * f for f in expected])


def test_cosine_schedule_needs_a_stage_length() -> None:
    model = tiny_lora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match="cosine_restart"):
        make_lr_scheduler(opt, OptimConfig(schedule="cosine_restart"), None)


# --------------------------------------------------------------------------- schedule (pure)


def test_unload_due_in_steps() -> None:
    fired, last = [], 0
    for step in range(1, 13):
        if unload_due(step, last, 4):
            fired.append(step)
            last = step
    assert fired == [4, 8, 12]


def test_unload_due_in_samples_fires_at_first_step_boundary_at_or_after_the_point() -> None:
    # global batch 24, a point every 50 samples: 50 is inside step 3 (48..72], 100 inside step 5.
    fired, last = [], 0
    for step in range(1, 11):
        samples = 24 * step
        if unload_due(samples, last, 50):
            fired.append((step, samples))
            last = samples
    assert fired == [(3, 72), (5, 120), (7, 168), (9, 216)]
    # The paper's setting: 4.8k samples at global batch 24 is exactly every 200 steps.
    assert [s for s in range(1, 601) if unload_due(24 * s, 24 * (s - 1), 4800)] == [200, 400, 600]
    # Several points inside one step fire one unload.
    assert unload_due(100, 0, 10) and not unload_due(100, 100, 10)
    with pytest.raises(ValueError, match=r"plora\.unload_every.*found 0"):
        unload_due(1, 0, 0)


def test_stage_length_rounds_sample_intervals_up_to_whole_steps() -> None:
    model = tiny_lora()
    assert (
        PLoRA(model, PLoRAConfig(unload_every=50), 24, 0, TorchParamAccess(None)).stage_length_steps
        == 3
    )
    cfg = PLoRAConfig(unload_every=7, unload_unit="steps")
    assert PLoRA(model, cfg, 24, 0, TorchParamAccess(None)).stage_length_steps == 7


# --------------------------------------------------------------------------- precision + rank


def test_stochastic_rounding_is_unbiased_for_bf16_and_fp16() -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.tensor([1.0 + 2**-10, -3.0 - 2**-9, 0.02 + 1e-5], dtype=torch.float32)
        xs = x.repeat(20000, 1)
        sr = round_to_dtype(xs, dtype, "stochastic", g).float().mean(0)
        near = round_to_dtype(x, dtype, "nearest", None).float()
        spacing = (
            torch.nextafter(x.to(dtype), torch.full_like(x, 10).to(dtype)).float()
            - x.to(dtype).float()
        ).abs()
        assert ((sr - x).abs() < 0.03 * spacing).all(), (dtype, sr - x, spacing)
        assert ((near - x).abs() > 0.05 * spacing).any()  # nearest is off by a fixed amount


def merge_run(rounding: str, rho: float, base_dir: Path, unloads: int = 50) -> dict[str, float]:
    """50 unloads on a bf16 tiny LLaMA, each merging a consistent-direction update of relative
    size ``rho`` (||ΔW||_F / ||W||_F per unload, with 30% jitter), as repeated stages of training
    toward one target produce. Returns ``PLoRA.cumulative_merge_stats()`` over all layers.
    ``base_dir`` holds the base model's safetensors (the W_0 source of ``from_base``).
    """
    model = tiny_lora("bfloat16")
    pairs = lora_pairs(model)
    g = torch.Generator().manual_seed(5)
    directions = []
    for p in pairs:
        b, a = torch.randn(p.B.shape, generator=g), torch.randn(p.A.shape, generator=g)
        s = rho * p.base.float().norm() / (p.scaling * b @ a).norm()
        directions.append((b * s, a))
    jitter = (1 + 0.3 * torch.randn(unloads, generator=g)).tolist()
    plora = PLoRA(
        model,
        PLoRAConfig(momentum=0.0, merge_rounding=rounding, rank_sample_layers=0),
        24,
        0,
        TorchParamAccess(None),
        track_all_layers=True,
        base_weights=safetensors_base_weights(base_dir),
    )
    for k in range(unloads):
        with torch.no_grad():
            for p, (b, a) in zip(pairs, directions):
                p.B.copy_(b * jitter[k])
                p.A.copy_(a)
        report = plora.unload(k + 1, 24 * (k + 1))
    stats = plora.cumulative_merge_stats()
    assert report.cumulative_rel_error == pytest.approx(stats["cumulative_rel_error"], rel=1e-6)
    return stats


@pytest.fixture(scope="module")
def bf16_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bf16 tiny base model (the same seed as ``tiny_lora``) saved as safetensors."""
    d = tmp_path_factory.mktemp("bf16_base")
    base = load_model(ModelConfig(tiny=SMALL, dtype="bfloat16"), seed=0, vocab_size=VOCAB)
    base.save_pretrained(d)
    return d


def test_merge_precision_over_50_unloads_nearest_vs_stochastic_vs_from_base(
    bf16_base_dir: Path,
) -> None:
    """Side by side on the same updates, rho = 1e-3 and 1e-2 of ||W|| per unload (LR-1e-4 sizes).

    * nearest silently drops per-element updates under half a bf16 ulp (~2^-9 of |w|): biased.
    * stochastic is unbiased (along the intended direction it applies the update within 1%), but
      its zero-mean error adds up like a random walk: Frobenius error ~3e-4/rho after 50 unloads,
      so it misses the issue's 1% target at these sizes (about 20% / 3% here).
    * from_base re-rounds W_0 + Σ intended at each unload: one rounding, no accumulation; its
      error is the bf16 grid's floor (~1.6e-3·||W|| / ||Σ intended||).
    Status of the 1% target (50 unloads, bf16): met by from_base at rho = 1e-2 (Σ ~ 0.5·||W||);
    at rho = 1e-3 (Σ ~ 0.05·||W||) no bf16 backbone can meet it (the grid itself is ~3% away),
    and from_base is asserted to sit near that floor, far below stochastic.
    """
    res = {
        (r, rho): merge_run(r, rho, bf16_base_dir)
        for rho in (1e-3, 1e-2)
        for r in ("nearest", "stochastic", "from_base")
    }
    for rho, near_min in ((1e-3, 0.4), (1e-2, 0.05)):
        near, sr, fb = (res[(r, rho)] for r in ("nearest", "stochastic", "from_base"))
        assert abs(sr["retained_fraction"] - 1.0) <= 0.01, (rho, sr)
        assert abs(fb["retained_fraction"] - 1.0) <= 0.01, (rho, fb)
        assert near["cumulative_rel_error"] > near_min, (rho, near)
        assert sr["cumulative_rel_error"] < 0.6 * near["cumulative_rel_error"], (rho, near, sr)
        assert fb["cumulative_rel_error"] < 0.25 * sr["cumulative_rel_error"], (rho, sr, fb)
    assert res[("nearest", 1e-3)]["retained_fraction"] < 0.8  # sub-ulp updates: about half kept
    assert res[("stochastic", 1e-2)]["cumulative_rel_error"] > 0.01  # the random walk misses 1%
    assert res[("from_base", 1e-2)]["cumulative_rel_error"] < 0.01  # the 1% target
    assert res[("from_base", 1e-3)]["cumulative_rel_error"] < 0.05  # the grid's floor, ~3%


def test_from_base_writes_the_nearest_bf16_value_of_w0_plus_all_merged_updates(
    bf16_base_dir: Path,
) -> None:
    model = tiny_lora("bfloat16")
    w0 = {p.name: p.base.detach().float().clone() for p in lora_pairs(model)}
    cfg = PLoRAConfig(momentum=0.1, merge_rounding="from_base", rank_sample_layers=0)
    plora = PLoRA(
        model,
        cfg,
        24,
        0,
        TorchParamAccess(None),
        track_all_layers=True,
        base_weights=safetensors_base_weights(bf16_base_dir),
    )
    for k in range(3):
        randomise_B(model, 0.002, seed=50 + k)
        plora.unload(k + 1, 24 * (k + 1))
    for p in lora_pairs(model):
        target = w0[p.name] + plora.intended_sum[p.name]
        w = p.base.detach()
        up = torch.nextafter(w, torch.full_like(w, math.inf)).float()
        down = torch.nextafter(w, torch.full_like(w, -math.inf)).float()
        # Within half a spacing of the exact target: one rounding, nothing accumulated (the
        # spacing on either side differs at powers of two, so take the larger).
        half_ulp = 0.5 * torch.maximum(up - w.float(), w.float() - down)
        assert ((w.float() - target).abs() <= half_ulp * (1 + 1e-3)).all(), p.name
        assert torch.count_nonzero(w.float() - w0[p.name]) > 0  # the updates were applied
    state = plora.state_dict()
    assert all(len(v) == 3 for v in state["base_factors"].values())


def test_from_base_needs_a_source_of_the_base_weights() -> None:
    model = tiny_lora("bfloat16")
    with pytest.raises(ValueError, match=r"plora\.merge_rounding.*base_weights.*'from_base'"):
        PLoRA(model, PLoRAConfig(merge_rounding="from_base"), 24, 0, TorchParamAccess(None))


def test_effective_rank_counts_singular_values_above_relative_threshold() -> None:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g))

    def with_spectrum(values: list[float]) -> torch.Tensor:
        s = torch.zeros(30)
        s[: len(values)] = torch.tensor(values)
        return u[:, :30] @ torch.diag(s) @ v.T

    assert effective_rank(with_spectrum([5.0, 3.0, 1.0]), 0.01) == 3
    assert effective_rank(with_spectrum([1.0, 0.02, 0.005]), 0.01) == 2
    assert effective_rank(with_spectrum([1.0] * 30), 0.01) == 30
    assert effective_rank(torch.zeros(8, 5), 0.01) == 0
    low = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g)
    assert effective_rank(low, 0.01) == 3
    assert effective_rank(low.to(torch.bfloat16), 0.01) == 3
    with pytest.raises(ValueError, match="rank_threshold"):
        effective_rank(low, 0.0)


def test_unload_reports_rank_of_cumulative_update_growing_with_unloads() -> None:
    model = tiny_lora(rank=2)
    cfg = PLoRAConfig(momentum=0.0, rank_sample_layers=2)
    plora = PLoRA(model, cfg, 24, 0, TorchParamAccess(None))
    ranks = []
    for k in range(4):
        randomise_B(model, 0.05, seed=100 + k)
        report = plora.unload(k + 1, 24 * (k + 1))
        assert len(report.effective_rank) == 2
        ranks.append(min(report.effective_rank.values()))
    assert ranks == [2, 4, 6, 8]  # rank T·r after T unloads (fresh A each time)


# --------------------------------------------------------------------------- resume


def test_state_dict_resume_continues_exactly() -> None:
    cfg = PLoRAConfig(
        momentum=0.0, unload_every=6, unload_unit="samples"
    )  # every 3 steps (batch 2)
    optim = OptimConfig(lr=1e-3, schedule="warmup_restart", warmup_steps=2)

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, object, PLoRA]:
        model = tiny_lora()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        plora = PLoRA(model, cfg, 2, 3, TorchParamAccess(opt))
        plora.scheduler = make_lr_scheduler(opt, optim, plora.stage_length_steps)
        return model, opt, plora.scheduler, plora

    model, opt, sched, plora = build()
    train_steps(model, opt, 8, seed=40, sched=sched, plora=plora)

    model2, opt2, sched2, plora2 = build()
    train_steps(model2, opt2, 4, seed=40, sched=sched2, plora=plora2)
    saved = copy.deepcopy(
        (model2.state_dict(), opt2.state_dict(), sched2.state_dict(), plora2.state_dict())
    )
    model3, opt3, sched3, plora3 = build()
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    sched3.load_state_dict(saved[2])
    plora3.load_state_dict(saved[3])
    train_steps(model3, opt3, 4, seed=40, sched=sched3, plora=plora3, start=4)

    assert plora3.num_unloads == plora.num_unloads == 2
    for (n, p), (_, q) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(p, q), n
    assert plora3.delta_effective_rank() == plora.delta_effective_rank()


# --------------------------------------------------------------------------- rank from factors


def test_factor_rank_equals_dense_rank_on_random_and_rank_deficient_factors() -> None:
    g = torch.Generator().manual_seed(7)
    cases: list[list[tuple[torch.Tensor, torch.Tensor]]] = [
        # full-rank merges: rank k·r
        [(torch.randn(60, 3, generator=g), torch.randn(3, 40, generator=g)) for _ in range(4)],
        # wider than tall: the rank is capped by out
        [(torch.randn(5, 3, generator=g), torch.randn(3, 40, generator=g)) for _ in range(3)],
    ]
    shared_a = torch.randn(3, 40, generator=g)
    # every merge in A's row space: rank 3, not 9
    cases.append([(torch.randn(60, 3, generator=g), shared_a) for _ in range(3)])
    b = torch.randn(60, 4, generator=g)
    # a merge that cancels the first one: zero update, rank 0
    cases.append([(b, shared_a[:2].repeat(2, 1)), (-b, shared_a[:2].repeat(2, 1))])
    # a spectrum straddling the threshold: 1, 0.5, 0.02 (kept), 0.001 (dropped) of σ_max
    u, _ = torch.linalg.qr(torch.randn(60, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 4, generator=g))
    spectrum = torch.tensor([1.0, 0.5, 0.02, 0.001])
    cases.append([(u[:, :2] * spectrum[:2], v[:, :2].T), (u[:, 2:] * spectrum[2:], v[:, 2:].T)])
    for factors in cases:
        dense = sum(bb @ aa for bb, aa in factors)
        assert isinstance(dense, torch.Tensor)
        assert factor_effective_rank(factors, 0.01) == effective_rank(dense, 0.01)
    assert [factor_effective_rank(f, 0.01) for f in cases] == [12, 5, 3, 0, 3]
    assert factor_effective_rank([], 0.01) == 0


@pytest.mark.parametrize("rounding", ["stochastic", "from_base"])
def test_unload_rank_from_factors_equals_dense_rank_of_merged_change(
    rounding: str, bf16_base_dir: Path
) -> None:
    """With momentum (B kept at m·B, A unchanged: merges share A's row space) and from_base, the
    reported rank is the dense rank of Σ intended, and of W_now - W_0 on an fp32 backbone."""
    for dtype in ("float32", "bfloat16"):
        if rounding == "from_base" and dtype == "float32":
            continue
        model = tiny_lora(dtype, rank=2)
        cfg = PLoRAConfig(momentum=0.5, rank_sample_layers=3, merge_rounding=rounding)
        src = safetensors_base_weights(bf16_base_dir) if rounding == "from_base" else None
        plora = PLoRA(model, cfg, 24, 0, TorchParamAccess(None), base_weights=src)
        for k in range(3):
            randomise_B(model, 0.05, seed=200 + k)
            report = plora.unload(k + 1, 24 * (k + 1))
            dense = {n: effective_rank(s, 0.01) for n, s in plora.intended_sum.items()}
            assert report.effective_rank == dense
            assert set(report.effective_rank.values()) == {2}  # A's row space: rank r
        if dtype == "float32":
            assert plora.delta_effective_rank() == plora.effective_ranks()


def test_merge_error_warning_names_the_rounding_once_per_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """bf16 with tiny merges (LR-1e-4 sizes): stochastic rounding misses most of each merge."""
    model = tiny_lora("bfloat16")
    cfg = PLoRAConfig(momentum=0.0, merge_rounding="stochastic")
    plora, recorder = build_recorded_plora(model, cfg, 24, 0, TorchParamAccess(None), None, None)
    reports = []
    with caplog.at_level(logging.WARNING, logger="plora_ray.recorded_unload"):
        for k in range(2):
            randomise_B(model, 1e-4, seed=300 + k)
            reports.append(
                recorded_unload(plora, recorder, k + 1, 24 * (k + 1), warned=bool(reports))
            )
    assert all(r["merge_rel_error"] > MERGE_ERROR_WARN_THRESHOLD for r in reports)
    warning = reports[0]["merge_warning"]
    assert "plora.merge_rounding=stochastic" in warning and "from_base" in warning
    assert f"{reports[0]['merge_rel_error']:.1%}" in warning
    assert [r.getMessage() for r in caplog.records] == [warning]  # logged once
    # A large merge passes without one.
    randomise_B(model, 0.5, seed=400)
    assert "merge_warning" not in recorded_unload(plora, recorder, 3, 72, warned=True)


def test_from_base_unload_reads_each_base_weight_once(bf16_base_dir: Path) -> None:
    model = tiny_lora("bfloat16")
    src = LastReadCache(safetensors_base_weights(bf16_base_dir))
    cfg = PLoRAConfig(momentum=0.0, merge_rounding="from_base")
    plora, recorder = build_recorded_plora(model, cfg, 24, 0, TorchParamAccess(None), None, src)
    for k in range(2):
        randomise_B(model, 0.05, seed=500 + k)
        recorded_unload(plora, recorder, k + 1, 24 * (k + 1), warned=False)
        assert src.reads == len(plora.pairs) * (k + 1)  # the merge and the recorder's check
    assert [r.num_exceptions for r in recorder.records] == [0, 0]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "from_base"])
def test_cumulative_error_matches_a_dense_recount_and_survives_a_resume(
    rounding: str, bf16_base_dir: Path
) -> None:
    """The unload keeps no W_0 copy: its cumulative error (the drift of the sampled layers) must
    equal ||(W_now - W_0) - Σ intended|| / ||Σ intended|| counted here from a W_0 copy and the
    factors each unload merged, including across a state_dict round trip into a fresh PLoRA."""
    model = tiny_lora("bfloat16")
    pairs = lora_pairs(model)
    w0 = {p.name: p.base.detach().float().clone() for p in pairs}
    cfg = PLoRAConfig(momentum=0.2, merge_rounding=rounding, rank_sample_layers=3)
    src = safetensors_base_weights(bf16_base_dir) if rounding == "from_base" else None
    plora = PLoRA(model, cfg, 24, 0, TorchParamAccess(None), base_weights=src)
    tracked = [pairs[i].name for i in plora.sampled]
    intended = {n: torch.zeros_like(w0[n], dtype=torch.float64) for n in tracked}
    for k in range(4):
        if k == 2:  # resume: a fresh PLoRA on the same model, from the saved state
            state = copy.deepcopy(plora.state_dict())
            plora = PLoRA(model, cfg, 24, 0, TorchParamAccess(None), base_weights=src)
            plora.load_state_dict(state)
        randomise_B(model, 0.003, seed=300 + k)
        for p in pairs:
            if p.name in intended:
                coef = (1 - cfg.momentum) * p.scaling
                intended[p.name] += coef * (p.B.double() @ p.A.double())
        report = plora.unload(k + 1, 24 * (k + 1))
        err = sum(
            float(((p.base.double() - w0[p.name].double()) - intended[p.name]).pow(2).sum())
            for p in pairs
            if p.name in intended
        )
        norm = sum(float(s.pow(2).sum()) for s in intended.values())
        assert report.cumulative_rel_error == pytest.approx(math.sqrt(err / norm), rel=1e-3)
        assert report.cumulative_rel_error > 0  # bf16: the merges were rounded


def test_a_state_saved_with_w0_and_intended_sum_resumes_to_the_same_cumulative_error() -> None:
    """Checkpoints written before the drift replaced W_0 + Σ intended still resume exactly."""
    cfg = PLoRAConfig(momentum=0.1, rank_sample_layers=2)
    reports = []
    for legacy in (False, True):
        model = tiny_lora("bfloat16")
        pairs = lora_pairs(model)
        w0 = {p.name: p.base.detach().clone() for p in pairs}
        plora = PLoRA(model, cfg, 24, 0, TorchParamAccess(None))
        for k in range(2):
            randomise_B(model, 0.003, seed=400 + k)
            plora.unload(k + 1, 24 * (k + 1))
        state = copy.deepcopy(plora.state_dict())
        if legacy:
            drift = state.pop("drift")
            state["w0"] = {n: w0[n] for n in drift}
            state["intended_sum"] = {
                n: p.base.float() - w0[n].float() - drift[n]
                for n, p in ((q.name, q) for q in pairs)
                if n in drift
            }
        plora = PLoRA(model, cfg, 24, 0, TorchParamAccess(None))
        plora.load_state_dict(state)
        randomise_B(model, 0.003, seed=402)
        reports.append(plora.unload(3, 72).cumulative_rel_error)
    assert reports[1] == pytest.approx(reports[0], rel=1e-5)
