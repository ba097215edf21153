"""benchmarks/search_quality.py: the figures' arithmetic, the compute ledger, the trial's
checkpoint, and one tiny run of all four searches on a local Ray."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import learning_real as lr
from benchmarks import search_quality as sq
from plora_ray.model import load_tokenizer


def test_anytime_curve_is_the_running_best_and_ends_at_the_search_total() -> None:
    curve = sq.anytime_curve([(100, 3.9), (150, 4.1), (300, 3.7)], total=420)
    assert curve == [[100, 3.9], [150, 3.9], [300, 3.7], [420, 3.7]]
    assert sq.anytime_curve([], total=50) == []


def test_compute_to_reach_is_the_first_point_at_or_below_the_target_as_a_budget_fraction() -> None:
    curve = [[100.0, 3.9], [200.0, 3.8], [400.0, 3.7]]
    assert sq.compute_to_reach(curve, 3.8, budget=400) == 0.5
    assert sq.compute_to_reach(curve, 3.85, budget=400) == 0.5
    assert sq.compute_to_reach(curve, 3.95, budget=400) == 0.25
    assert sq.compute_to_reach(curve, 3.6, budget=400) is None


def test_mean_interval_is_a_t_interval_that_collapses_for_one_seed() -> None:
    out = sq.mean_interval([1.0, 2.0, 3.0], level=0.9)
    # t(0.95, 2 dof) = 2.919986; std 1, n 3.
    half = 2.919986 / math.sqrt(3)
    assert out["mean"] == pytest.approx(2.0)
    assert out["lo"] == pytest.approx(2.0 - half, rel=1e-5)
    assert out["hi"] == pytest.approx(2.0 + half, rel=1e-5)
    assert sq.mean_interval([3.5]) == {"mean": 3.5, "lo": 3.5, "hi": 3.5}


def test_a_seed_that_never_reaches_the_target_counts_as_the_whole_budget() -> None:
    out = sq.fraction_summary([0.25, None, 0.75])
    assert out["mean"] == pytest.approx((0.25 + 1.0 + 0.75) / 3)
    assert (out["min"], out["max"], out["reached"]) == (0.25, 1.0, "2/3")
    assert out["per_seed"] == [0.25, None, 0.75]


def test_ledger_adds_each_trials_newest_total_in_arrival_order_and_stops_at_the_budget() -> None:
    ledger = sq.ComputeLedger(budget=1000)
    assert not ledger("a", {"compute": 300})
    ledger("b", {"compute": 200})
    ledger("a", {"compute": 500, "objective": 3.9})
    ledger("a", {"compute": 500, "objective": 3.9})  # Tune's duplicate of a last result
    assert ledger.events == [(700, 3.9)] and not ledger.stop_all()
    ledger("b", {"compute": 600})
    assert ledger.total == 1100 and ledger.stop_all()
    assert not sq.ComputeLedger(budget=None).stop_all()


def test_quick_budget_counts_training_and_every_scored_dialogue_equally_for_both_pbts() -> None:
    s = sq.settings(quick=True)
    # 64 steps of 8, a proxy of 32 at the unloads at steps 16, 32 and 48, a test of 128.
    assert sq.unload_proxy_points(s) == sq.stock_proxy_points(s) == 3
    assert sq.trial_cost(s, 3) == 64 * 8 + 3 * 32 + 128
    assert sq.budget(s) == 4 * (64 * 8 + 3 * 32 + 128)
    assert s["stock_pbt_interval"] % s["unload_every"] != 0  # perturbs inside stages


def test_a_checkpoint_restores_backbone_adapter_optimizer_and_plora_state(tmp_path) -> None:
    s = sq.settings(quick=True, tiny=True)
    base_s = s["base"]
    tok = load_tokenizer(lr.model_config(base_s))
    corpus = lr.load_corpus(base_s, tok)
    base = lr.load_model(lr.model_config(base_s), seed=0)
    pad = int(tok.pad_token_id)
    method = lr.Method("plora", 8, 0.2, 2)

    def steps(ft: lr.Finetuning, first: int, last: int) -> None:
        for step in range(first, last + 1):
            lr.train_step(ft, corpus.finetune[step * 2 : step * 2 + 2], pad)
            assert ft.plora is not None
            if ft.plora.due(step, step * 2):
                ft.plora.unload(step, step * 2)

    straight = lr.start_finetune(base, method, 3e-3, 0, 2)
    steps(straight, 1, 6)
    first = lr.start_finetune(base, method, 3e-3, 0, 2)
    steps(first, 1, 3)
    sq.save_state(first, 3, tmp_path / "ckpt")
    resumed = lr.start_finetune(base, method, 3e-3, 0, 2)
    assert sq.load_state(resumed, tmp_path / "ckpt") == 3
    steps(resumed, 4, 6)
    assert resumed.plora is not None and resumed.plora.num_unloads == 3
    for (name, p), q in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values()
    ):
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.slow
def test_tiny_run_of_all_four_searches_writes_the_headline_and_monotone_curves(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv(lr.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "sq.json"
    result = sq.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text())["headline"] == json.loads(json.dumps(result["headline"]))
    head = result["headline"]
    for key in (
        "pbt_unload_compute_to_tpe_best",
        "pbt_unload_full_budget_compute_to_tpe_best",
        "pbt_unload_half_budget_compute_to_tpe_best",
        "stock_pbt_compute_to_tpe_best",
        "random_compute_to_tpe_best",
    ):
        assert set(head[key]) >= {"mean", "min", "max", "reached", "per_seed"}
    assert set(head["best_objective"]) == {*sq.METHODS, sq.HALF}
    searches = result["searches"]
    assert sorted(r["method"] for r in searches) == sorted([*sq.METHODS, sq.HALF])
    for r in searches:
        assert r["trials_finished"] >= 1, r
        compute = [c for c, _ in r["curve"]]
        best = [b for _, b in r["curve"]]
        assert compute == sorted(compute) and best == sorted(best, reverse=True)
        assert r["best"] == min(t["objective"] for t in r["trials"] if t["finished"])
    by = {r["method"]: r for r in searches}
    # A member that never forked trains exactly as the random trial at its point, paused and
    # resumed from its checkpoints (3 members on 2 slots) or not: proxies and checkpoints do
    # not disturb training.
    alone = {
        json.dumps(t["config"], sort_keys=True): t["objective"] for t in by["random"]["trials"]
    }
    for method in ("stock_pbt", "pbt_unload", sq.HALF):
        for t in by[method]["trials"]:
            key = json.dumps(t["config"], sort_keys=True)
            if key in alone and not t["forked_from"]:
                assert t["objective"] == alone[key], (method, t)
    s = sq.settings(quick=False, tiny=True)
    # The population methods start from the same points; TPE + ASHA stops at the budget.
    assert by["random"]["points"] == by["stock_pbt"]["points"] == by["pbt_unload"]["points"]
    assert by["tpe_asha"]["compute"] >= sq.budget(s)
    assert by["tpe_asha"]["compute_to_tpe_best"] <= by["tpe_asha"]["compute_fraction"]
    # The half-population pbt_unload run spends about half the budget; pbt_unload's headline is
    # the earlier of its two runs.
    assert by[sq.HALF]["compute"] <= 0.75 * sq.budget(s)
    runs = [by[m]["compute_to_tpe_best"] for m in ("pbt_unload", sq.HALF)]
    reached = [f for f in runs if f is not None]
    assert head["pbt_unload_compute_to_tpe_best"]["per_seed"] == [min(reached) if reached else None]
