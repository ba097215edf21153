"""Checkpoint pieces without Ray: the compact record of the backbone's change, RNG, export."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from plora_ray.checkpoint import (
    BackboneRecorder,
    backbone_digests,
    capture_rng,
    dir_bytes,
    load_backbone,
    replay_backbone,
    restore_rng,
    save_backbone,
    tensor_digest,
)
from plora_ray.config import LoraConfig, ModelConfig, PLoRAConfig, TinyModelConfig
from plora_ray.merge import add_with_rounding
from plora_ray.model import load_model, load_tokenizer
from plora_ray.model_export import export_model
from plora_ray.plora import PLoRA, TorchParamAccess, attach_lora, derive_seed

TINY = ModelConfig(
    tiny=TinyModelConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    dtype="bfloat16",
)
RANK = 2


def _generator_for(seed: int):
    def make(unload_index: int, layer_index: int, device: object = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, unload_index, layer_index, "merge"))
        return g

    return make


def _base(seed: int = 0) -> torch.nn.Module:
    model = load_model(TINY, seed=seed, vocab_size=64)
    return attach_lora(model, LoraConfig(rank=RANK, alpha=4.0), "plora")


def _trained(seed: int, coef_scale: float = 1.0, unloads: int = 2, add=add_with_rounding):
    """A PLoRA model after ``unloads`` unloads of random adapters, with its recorder (whose
    replay check merges with ``add``)."""
    model = _base(seed)
    access = TorchParamAccess(None)
    momentum = 0.1
    cfg = PLoRAConfig(
        unload_every=1,
        unload_unit="steps",
        momentum=momentum,
        merge_rounding="stochastic",
        rank_sample_layers=0,
    )
    from plora_ray.plora import lora_pairs

    pairs = lora_pairs(model)
    names = {id(p): n for n, p in model.named_parameters()}
    rec = BackboneRecorder(
        access,
        pairs,
        names,
        _generator_for(seed),
        add,
        coef_for=lambda pr: (1.0 - momentum) * pr.scaling * coef_scale,
        rounding="stochastic",
    )
    plora = PLoRA(model, cfg, global_batch=4, seed=seed, access=rec)
    g = torch.Generator().manual_seed(seed + 1)
    for k in range(unloads):
        # An adapter as training would leave it: B moved away from its zero init. The update is
        # ~1% of the weights, so stochastic rounding changes many backbone elements.
        for pr in pairs:
            with torch.no_grad():
                pr.B.copy_(torch.randn(pr.B.shape, generator=g) * 0.3)
        rec.begin_unload(plora.num_unloads, k + 1)
        plora.unload(k + 1, 4 * (k + 1))
        rec.end_unload()
    return model, rec, pairs


def test_recorder_checks_every_layer_at_the_first_unload_then_one_per_unload(tmp_path):
    # The replay check is a second merge: all layers at the first unload, then one in rotation.
    merges: list[int] = []

    def counted_add(weight, delta, rounding, generator):
        merges.append(weight.numel())
        add_with_rounding(weight, delta, rounding, generator)

    model, rec, pairs = _trained(seed=7, unloads=3, add=counted_add)
    assert len(merges) == len(pairs) + 2
    assert [r.num_exceptions for r in rec.records] == [0, 0, 0]
    names = sorted({ld.name for r in rec.records for ld in r.layers})
    save_backbone(
        rec.records, backbone_digests(model, names, TorchParamAccess(None)), tmp_path / "b"
    )
    records, digests = load_backbone(tmp_path / "b")
    fresh = _base(seed=7)
    replay_backbone(
        fresh, records, TorchParamAccess(None), _generator_for(7), add_with_rounding, digests
    )
    # Once the check finds a difference, every layer is checked at every later unload.
    merges.clear()
    _, rec, pairs = _trained(seed=7, coef_scale=0.5, unloads=3, add=counted_add)
    assert len(merges) == 3 * len(pairs)
    assert all(r.num_exceptions > 0 for r in rec.records)


def _backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_backbone_replay_from_base_is_bit_exact_and_needs_no_exceptions(tmp_path):
    model, rec, pairs = _trained(seed=3)
    trained = _backbone(model)
    fresh = _base(seed=3)
    changed = sum(
        int((trained[n] != p).sum()) for n, p in fresh.named_parameters() if not p.requires_grad
    )
    assert changed > 1000, "the unloads should have changed the backbone"
    # The replay reproduces the unload's arithmetic and generator bits: nothing to store verbatim.
    assert [r.num_exceptions for r in rec.records] == [0, 0]

    names = sorted({ld.name for r in rec.records for ld in r.layers})
    digests = backbone_digests(model, names, TorchParamAccess(None))
    save_backbone(rec.records, digests, tmp_path / "backbone")
    records, loaded_digests = load_backbone(tmp_path / "backbone")
    assert [r.index for r in records] == [0, 1]
    replay_backbone(
        fresh, records, TorchParamAccess(None), _generator_for(3), add_with_rounding, loaded_digests
    )
    for n, p in fresh.named_parameters():
        if not p.requires_grad:
            assert torch.equal(
                p.view(torch.int16) if p.dtype == torch.bfloat16 else p,
                trained[n].view(torch.int16) if p.dtype == torch.bfloat16 else trained[n],
            ), n


def test_backbone_record_is_compact_against_a_full_copy(tmp_path):
    model, rec, pairs = _trained(seed=0)
    names = sorted({ld.name for r in rec.records for ld in r.layers})
    stored = save_backbone(
        rec.records, backbone_digests(model, names, TorchParamAccess(None)), tmp_path / "backbone"
    )
    target_bytes = sum(pr.base.numel() * pr.base.element_size() for pr in pairs)
    # Per unload and layer: r*(in+out) fp32 numbers instead of in*out bf16 ones. Here
    # 2*(128+128)*4 = 2 KiB vs 32 KiB for a 128x128 projection, i.e. ~1/16 per unload.
    per_unload = stored / len(rec.records)
    assert per_unload < target_bytes / 8, (stored, target_bytes)
    # The same arithmetic at LLaMA-7B scale (rank 8, 7 projections x 32 layers): per unload
    # 8*(in+out)*4 bytes per projection against 13.5 GB for the bf16 backbone.
    shapes = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    per_unload_7b = 32 * sum(8 * (o + i) * 4 for o, i in shapes)
    assert per_unload_7b < 100e6  # ~45 MB per unload


def _from_base_run(
    seed: int,
    w0_file,
    coef_scale: float = 1.0,
    unloads: int = 2,
    model=None,
    records=None,
    state=None,
):
    """A from_base PLoRA with its recorder; ``unloads`` unloads of random adapters.

    With ``model``/``records``/``state`` it continues a run as the trainer's resume does: the
    records loaded, the PLoRA state without its factors, the factors rebuilt from the records.
    """
    from plora_ray.merge import safetensors_base_weights
    from plora_ray.plora import lora_pairs

    model = _base(seed) if model is None else model
    src = safetensors_base_weights(w0_file)
    momentum = 0.1
    cfg = PLoRAConfig(
        unload_every=1,
        unload_unit="steps",
        momentum=momentum,
        merge_rounding="from_base",
        rank_sample_layers=0,
    )
    pairs = lora_pairs(model)
    names = {id(p): n for n, p in model.named_parameters()}
    rec = BackboneRecorder(
        TorchParamAccess(None),
        pairs,
        names,
        _generator_for(seed),
        add_with_rounding,
        coef_for=lambda pr: (1.0 - momentum) * pr.scaling * coef_scale,
        rounding="from_base",
        base_weights=src,
    )
    plora = PLoRA(model, cfg, global_batch=4, seed=seed, access=rec, base_weights=src)
    if records is not None:
        rec.records = records
        plora.load_state_dict(state)
        plora.base_factors = rec.from_base_factors()
    g = torch.Generator().manual_seed(seed + 100 * plora.num_unloads)
    for _ in range(unloads):
        for pr in pairs:
            with torch.no_grad():
                pr.B.copy_(torch.randn(pr.B.shape, generator=g) * 0.3)
        k = plora.num_unloads
        rec.begin_unload(k, k + 1)
        plora.unload(k + 1, 4 * (k + 1))
        rec.end_unload()
    return model, rec, plora, src


def _save_w0(seed: int, path):
    from safetensors.torch import save_file

    from plora_ray.plora import base_param_name, lora_pairs

    save_file(
        {base_param_name(pr.name): pr.base.detach().contiguous() for pr in lora_pairs(_base(seed))},
        str(path),
    )
    return path


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def test_from_base_records_replay_and_resume_bit_exactly(tmp_path):
    w0 = _save_w0(4, tmp_path / "w0.safetensors")
    model, rec, plora, src = _from_base_run(4, w0, unloads=2)
    # The recorder's replay (W_0 + all stored factors, one nearest rounding) is the unload's.
    assert [r.num_exceptions for r in rec.records] == [0, 0]
    assert all(ld.base_name.endswith("_proj.weight") for r in rec.records for ld in r.layers)
    names = sorted({ld.name for r in rec.records for ld in r.layers})
    save_backbone(
        rec.records, backbone_digests(model, names, TorchParamAccess(None)), tmp_path / "backbone"
    )
    records, digests = load_backbone(tmp_path / "backbone")
    assert records[1].rounding == "from_base" and records[1].layers[0].base_name

    # Resume as the trainer does: a fresh base, the backbone replayed (digests checked), the
    # adapters restored, the PLoRA state without its factors (rebuilt from the records).
    fresh = _base(4)
    replay_backbone(
        fresh,
        records,
        TorchParamAccess(None),
        _generator_for(4),
        add_with_rounding,
        digests,
        base_weights=src,
    )
    trained = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if p.requires_grad:
                p.copy_(trained[n])
            else:
                assert torch.equal(_bits(p), _bits(trained[n])), n
    state = {k: v for k, v in plora.state_dict().items() if k != "base_factors"}
    _, rec2, plora2, _ = _from_base_run(4, w0, unloads=0, model=fresh, records=records, state=state)
    assert plora2.base_factors.keys() == plora.base_factors.keys()
    for k, fs in plora.base_factors.items():
        for (b1, a1), (b2, a2) in zip(fs, plora2.base_factors[k], strict=True):
            assert torch.equal(b1, b2) and torch.equal(a1, a2), k

    # The next unload of both runs writes the same bits, recorded without exceptions.
    g = torch.Generator().manual_seed(99)
    for _m, pl, r in ((model, plora, rec), (fresh, plora2, rec2)):
        g.manual_seed(99)
        for pr in pl.pairs:
            with torch.no_grad():
                pr.B.copy_(torch.randn(pr.B.shape, generator=g) * 0.3)
        r.begin_unload(2, 3)
        pl.unload(3, 12)
        r.end_unload()
    assert rec2.records[2].num_exceptions == 0
    resumed = dict(fresh.named_parameters())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(_bits(p), _bits(resumed[n])), n


def test_from_base_replay_stays_exact_with_exceptions_and_needs_its_source(tmp_path):
    w0 = _save_w0(6, tmp_path / "w0.safetensors")
    # A recorder whose merged fraction is off: the differences are stored verbatim.
    model, rec, _, src = _from_base_run(6, w0, coef_scale=0.5, unloads=2)
    assert rec.records[1].num_exceptions > 0
    names = sorted({ld.name for r in rec.records for ld in r.layers})
    save_backbone(
        rec.records, backbone_digests(model, names, TorchParamAccess(None)), tmp_path / "b"
    )
    records, digests = load_backbone(tmp_path / "b")
    with pytest.raises(ValueError, match="base_weights"):
        replay_backbone(
            _base(6), records, TorchParamAccess(None), _generator_for(6), add_with_rounding, digests
        )
    fresh = _base(6)
    replay_backbone(
        fresh,
        records,
        TorchParamAccess(None),
        _generator_for(6),
        add_with_rounding,
        digests,
        base_weights=src,
    )
    trained = _backbone(model)
    for n, p in fresh.named_parameters():
        if not p.requires_grad:
            assert tensor_digest(p) == tensor_digest(trained[n]), n
    with pytest.raises(ValueError, match="base_weights"):
        BackboneRecorder(
            TorchParamAccess(None),
            [],
            {},
            _generator_for(6),
            add_with_rounding,
            coef_for=lambda pr: 1.0,
            rounding="from_base",
        )


def test_replay_stays_exact_when_the_factors_do_not_reproduce_the_unload(tmp_path):
    # A recorder whose idea of the merged fraction is off: its replay differs from what the unload
    # wrote, and the difference is stored verbatim, so the reconstruction is still exact.
    model, rec, _ = _trained(seed=5, coef_scale=0.5, unloads=1)
    assert rec.records[0].num_exceptions > 0
    names = sorted({ld.name for r in rec.records for ld in r.layers})
    save_backbone(
        rec.records, backbone_digests(model, names, TorchParamAccess(None)), tmp_path / "b"
    )
    records, digests = load_backbone(tmp_path / "b")
    fresh = _base(seed=5)
    replay_backbone(
        fresh, records, TorchParamAccess(None), _generator_for(5), add_with_rounding, digests
    )
    trained = _backbone(model)
    for n, p in fresh.named_parameters():
        if not p.requires_grad:
            assert tensor_digest(p) == tensor_digest(trained[n]), n


def test_replay_rejects_a_reconstruction_that_differs_from_the_digest(tmp_path):
    model, rec, _ = _trained(seed=1, unloads=1)
    names = sorted({ld.name for r in rec.records for ld in r.layers})
    save_backbone(
        rec.records, backbone_digests(model, names, TorchParamAccess(None)), tmp_path / "b"
    )
    records, digests = load_backbone(tmp_path / "b")
    # Replaying onto another base (seed 2 instead of 1) must not pass silently.
    with pytest.raises(ValueError, match="backbone reconstruction"):
        replay_backbone(
            _base(seed=2),
            records,
            TorchParamAccess(None),
            _generator_for(1),
            add_with_rounding,
            digests,
        )


def test_recorder_refuses_an_unload_it_did_not_see():
    model = _base(0)
    from plora_ray.plora import lora_pairs

    pairs = lora_pairs(model)
    rec = BackboneRecorder(
        TorchParamAccess(None),
        pairs,
        {},
        _generator_for(0),
        add_with_rounding,
        coef_for=lambda pr: 1.0,
        rounding="nearest",
    )
    rec.begin_unload(0, 1)
    with pytest.raises(RuntimeError, match="write_frozen"):
        rec.end_unload()


def test_load_unload_records_names_a_gap(tmp_path):
    model, rec, _ = _trained(seed=0, unloads=2)
    save_backbone(rec.records, {}, tmp_path / "b")
    (tmp_path / "b" / "unload_0000.safetensors").unlink()
    with pytest.raises(ValueError, match="expected unload records"):
        load_backbone(tmp_path / "b")


def test_rng_round_trip_reproduces_every_generator():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = capture_rng()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_export_writes_a_merged_model_that_from_pretrained_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(
        tiny=TinyModelConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        dtype="bfloat16",
    )
    tok = load_tokenizer(cfg)
    model = attach_lora(load_model(cfg, seed=0, vocab_size=len(tok)), LoraConfig(rank=2), "lora")
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    out = export_model(model, tok, tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    merged = dict(model.get_base_model().named_parameters())  # merged in place by the export
    for n, p in loaded.named_parameters():
        assert torch.equal(p, merged[n]), n
    with torch.no_grad():
        after = loaded(input_ids=ids).logits.float()
    # The merge rounds the fp32 adapter into the bf16 weights: close, not identical.
    assert torch.allclose(before, after, atol=0.05, rtol=0.05)
    assert dir_bytes(out) > 0


def test_export_is_sharded_with_an_index_above_the_shard_size(tmp_path):
    """A model bigger than the shard size is written as safetensors shards plus the index that
    from_pretrained follows (LLaMA-7B: 3 shards at EXPORT_SHARD_SIZE)."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(
        tiny=TinyModelConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        dtype="bfloat16",
    )
    tok = load_tokenizer(cfg)
    model = load_model(cfg, seed=0, vocab_size=len(tok))
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = export_model(model, tok, tmp_path / "model", max_shard_size="64KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards), shards
    assert not (out / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for n, p in loaded.named_parameters():
        assert torch.equal(p, want[n]), n


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (replay with CUDA generators)"
)
def test_backbone_replay_on_cuda_is_bit_exact(tmp_path):
    # On a GPU the unload merges on the device with a CUDA generator; the recorder must replay
    # there too (a CPU generator draws other bits).
    from plora_ray.plora import lora_pairs

    model = _base(seed=7).cuda()
    access = TorchParamAccess(None)
    pairs = lora_pairs(model)
    names = {id(p): n for n, p in model.named_parameters()}
    rec = BackboneRecorder(
        access,
        pairs,
        names,
        _generator_for(7),
        add_with_rounding,
        coef_for=lambda pr: 0.9 * pr.scaling,
        rounding="stochastic",
    )
    plora = PLoRA(
        model,
        PLoRAConfig(unload_every=1, unload_unit="steps", momentum=0.1, rank_sample_layers=0),
        global_batch=4,
        seed=7,
        access=rec,
    )
    for pr in pairs:
        with torch.no_grad():
            pr.B.copy_(torch.randn(pr.B.shape, device="cuda") * 0.3)
    rec.begin_unload(0, 1)
    plora.unload(1, 4)
    rec.end_unload()
    assert rec.records[0].num_exceptions == 0
    names_ = sorted({ld.name for ld in rec.records[0].layers})
    save_backbone(rec.records, backbone_digests(model, names_, access), tmp_path / "b")
    records, digests = load_backbone(tmp_path / "b")
    replay_backbone(
        _base(seed=7).cuda(), records, access, _generator_for(7), add_with_rounding, digests
    )
