"""Leaderboard: ranking, Pareto fronts, baseline gains, published files, atomic writes, merging,
the best config round trip, and the board built from a real finished smoke search.

Unit tests build search directories with ``make_search_dir``: the layout the search writes
(``search.json`` + ``trials/<id>.json``) and a real Optuna SQLite study holding the same trials,
so parameter importances are computed the way they are for a real search.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs as pafs
import pytest
import yaml
from ray_helpers import finished_smoke_search  # the session's one smoke search (a real job)

from plora_ray import leaderboard as lb
from plora_ray.cli import main
from plora_ray.config import RunConfig, config_from_dict, load_config
from plora_ray.objective import ObjectiveError, ObjectiveSpec
from plora_ray.store import Store, TrialRecord, atomic_write

T0 = 1_764_000_000.0  # a fixed "search started" time, so records are deterministic


def record(
    trial_id: str,
    method: str = "plora",
    rank: int = 8,
    status: str = "completed",
    *,
    gsm8k: float | None = None,
    mmlu: float | None = None,
    reason: str | None = None,
    params: dict[str, Any] | None = None,
    minute: float = 1.0,
    search: str = "unit",
    objective_value: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One trial record with every field the search writes; its config a validated run config."""
    params = dict(params if params is not None else {"lora.rank": rank, "method": method})
    sections = {f.name for f in dataclasses.fields(RunConfig)} - {"method"}
    overrides = {k: v for k, v in params.items() if k.split(".")[0] in sections}
    cfg = config_from_dict(
        {"method": method, "lora": {"rank": rank}, "train": {"max_steps": 6}}, overrides=overrides
    ).to_dict()
    objectives: dict[str, float] = {}
    if gsm8k is not None:
        objectives.update(gsm8k=gsm8k, gsm8k_flexible=gsm8k + 0.01, gsm8k_nll=2.5 - gsm8k)
    if mmlu is not None:
        objectives.update(
            mmlu=mmlu,
            mmlu_humanities=mmlu - 0.01,
            mmlu_stem=mmlu + 0.02,
            mmlu_social_sciences=mmlu,
            mmlu_other=mmlu - 0.02,
        )
    started = T0 + (minute - 1.0) * 60
    rec = {
        "trial_id": trial_id,
        "search": search,
        "status": status,
        "reason": reason,
        "params": params,
        "config": cfg,
        "method": method,
        "lora_rank": None if method == "full" else rank,
        "objectives": objectives,
        "objective_value": (
            objective_value if objective_value is not None else objectives.get("gsm8k")
        ),
        "proxy": 2.5 - (gsm8k or 0.0),
        "final_loss": 1.9 - (gsm8k or 0.0),
        "num_unloads": 3 if method == "plora" else 0,
        "delta_effective_rank": {"layers.0.q_proj": rank * 2, "layers.1.v_proj": rank * 2 + 1},
        "wall_time_s": 55.0 + minute,
        "accelerator_hours": 0.0,
        "checkpoint_path": f"/storage/{search}/trials/{trial_id}/checkpoint",
        "model_path": f"/storage/{search}/trials/{trial_id}/model",
        "started_at": started,
        "ended_at": started + 55.0,
        "loss_curve": [[s, 2.0 - 0.05 * s * (1 + (gsm8k or 0))] for s in range(7)],
    }
    rec.update(extra)
    return rec


def make_search_dir(
    root: Path,
    name: str,
    records: list[dict[str, Any]],
    *,
    objective: dict[str, Any] | None = None,
    study: bool = True,
    dirname: str | None = None,
) -> Path:
    """A search directory as the search writes it, plus a real Optuna study of the same trials."""
    objective = objective or {
        "metrics": ["gsm8k"],
        "directions": ["max"],
        "weights": None,
        "pareto": False,
    }
    d = root / (dirname or name)
    (d / "trials").mkdir(parents=True)
    db = d / "study.db"
    meta = {
        "name": name,
        "objective": objective,
        "source_yaml": "search: {}\n",
        "storage_url": f"sqlite:///{db}",
        "study_name": name,
    }
    (d / "search.json").write_text(json.dumps(meta))
    for rec in records:
        (d / "trials" / f"{rec['trial_id']}.json").write_text(json.dumps(rec))
    if study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions = ["maximize" if x == "max" else "minimize" for x in objective["directions"]]
        st = optuna.create_study(
            study_name=name,
            storage=meta["storage_url"],
            directions=directions if objective.get("pareto") else directions[:1],
        )
        for rec in records:
            numeric = {k: v for k, v in rec["params"].items() if isinstance(v, (int, float))}
            dists = {k: optuna.distributions.FloatDistribution(1e-6, 1e3) for k in numeric}
            if rec["status"] != "completed":
                st.add_trial(
                    optuna.trial.create_trial(
                        state=optuna.trial.TrialState.FAIL, params=numeric, distributions=dists
                    )
                )
                continue
            if objective.get("pareto"):
                values = [rec["objectives"][m] for m in objective["metrics"]]
            else:
                values = [rec["objective_value"]]
            st.add_trial(
                optuna.trial.create_trial(params=numeric, distributions=dists, values=values)
            )
    return d


def small_search(root: Path, name: str = "unit", **kw: Any) -> Path:
    """Six trials: PLoRA r8 x2, r4, LoRA r8 and r4 baselines, a full baseline, plus early-stopped,
    diverged and failed ones."""

    def p(rank: int, lr: float, mom: float | None = None) -> dict[str, Any]:
        # lora.rank and optim.lr in every trial (as a search sampling them for every method
        # does), plora.momentum only for plora (conditional): Optuna rates the first two.
        out: dict[str, Any] = {"lora.rank": rank, "optim.lr": lr}
        if mom is not None:
            out["plora.momentum"] = mom
        return out

    recs = [
        record(
            "t1", "plora", 8, gsm8k=0.30, mmlu=0.40, params=p(8, 1e-4, 0.1), minute=1, search=name
        ),
        record(
            "t2", "plora", 8, gsm8k=0.22, mmlu=0.45, params=p(8, 3e-4, 0.5), minute=2, search=name
        ),
        record(
            "t3", "plora", 4, gsm8k=0.18, mmlu=0.41, params=p(4, 2e-4, 0.2), minute=3, search=name
        ),
        record("t4", "lora", 8, gsm8k=0.25, mmlu=0.38, params=p(8, 1e-4), minute=4, search=name),
        record("t5", "lora", 4, gsm8k=0.10, mmlu=0.39, params=p(4, 5e-4), minute=5, search=name),
        record("t6", "full", 8, gsm8k=0.20, mmlu=0.35, params=p(8, 1e-5), minute=6, search=name),
        record(
            "t7",
            "plora",
            8,
            "early_stopped",
            params=p(8, 1e-3, 0.9),
            minute=7,
            search=name,
            reason="ASHA stopped it at step 3 (proxy 2.41)",
        ),
        record(
            "t8",
            "plora",
            8,
            "diverged",
            params=p(8, 5e-2, 0.1),
            minute=8,
            search=name,
            reason="loss nan at step 4",
        ),
        record(
            "t9",
            "plora",
            8,
            "failed",
            params=p(8, 1e-4, 0.3),
            minute=9,
            search=name,
            reason="RuntimeError: worker died",
        ),
    ]
    recs[6]["proxy"] = 2.41
    recs[7]["proxy"] = None
    recs[8]["proxy"] = None
    return make_search_dir(root, name, recs, **kw)


# --------------------------------------------------------------------------- pure logic


def test_pareto_fronts_non_dominated_sorting_respects_directions() -> None:
    pts = [[0.3, 0.4], [0.2, 0.5], [0.2, 0.4], [0.1, 0.1], [0.3, 0.4]]
    assert lb.pareto_fronts(pts, ["maximize", "maximize"]) == [0, 0, 1, 2, 0]
    # Minimising the second metric turns the order of the second column around.
    assert lb.pareto_fronts(pts, ["maximize", "minimize"]) == [0, 2, 1, 0, 0]


def test_objective_spec_parsing_accepts_aliases_and_names_bad_values() -> None:
    s = ObjectiveSpec.from_dict({"objective": {"metric": "gsm8k", "mode": "maximize"}}, "s.json")
    assert s == ObjectiveSpec("single", ("gsm8k",), ("maximize",), None)
    s = ObjectiveSpec.from_dict(
        {"metrics": ["gsm8k", "mmlu"], "directions": "max", "weights": {"gsm8k": 0.7, "mmlu": 0.3}},
        "s.json",
    )
    assert s.weights == (0.7, 0.3) and s.directions == ("maximize", "maximize")
    # Without the search's own objective_value the board recomputes it from the metrics.
    no_value = TrialRecord("t", "completed", objectives={"gsm8k": 0.5, "mmlu": 0.2})
    assert lb.score(s, no_value) == pytest.approx(0.41)
    with pytest.raises(ObjectiveError, match=r"s\.json: objective\.directions.*'up'"):
        ObjectiveSpec.from_dict(
            {"objective": {"metrics": ["gsm8k"], "directions": ["up"]}}, "s.json"
        )
    with pytest.raises(ObjectiveError, match="weights or pareto"):
        ObjectiveSpec.from_dict({"objective": {"metrics": ["gsm8k", "mmlu"]}}, "s.json")


def _rows(*recs: dict[str, Any]) -> list[lb.Row]:
    return [lb.Row(TrialRecord.from_dict(r, f"{r['trial_id']}.json"), "unit") for r in recs]


def test_scalar_ranking_orders_completed_by_objective_then_incomplete_by_status() -> None:
    rows = _rows(
        record("a", gsm8k=0.1),
        record("b", status="failed", reason="x"),
        record("c", gsm8k=0.3),
        record("d", status="early_stopped", proxy=1.0),
        record("e", status="diverged"),
        record("f", gsm8k=0.2),
    )
    spec = ObjectiveSpec("single", ("gsm8k",), ("maximize",))
    assert [r.record.trial_id for r in lb.rank_rows(rows, spec)] == ["c", "f", "a", "d", "e", "b"]
    assert [r.rank for r in lb.rank_rows(rows, spec)] == [1, 2, 3, 4, 5, 6]
    # Minimising the same metric reverses the completed part only.
    spec_min = ObjectiveSpec("single", ("gsm8k",), ("minimize",))
    assert [r.record.trial_id for r in lb.rank_rows(rows, spec_min)][:3] == ["a", "f", "c"]


def test_pareto_ranking_puts_the_front_first_and_marks_it() -> None:
    rows = _rows(
        record("dominated", gsm8k=0.1, mmlu=0.3),
        record("mmlu_best", gsm8k=0.2, mmlu=0.5),
        record("gsm_best", gsm8k=0.4, mmlu=0.2),
        record("mid", gsm8k=0.3, mmlu=0.35),
        record("second", gsm8k=0.25, mmlu=0.3),
        record("x", status="failed"),
    )
    spec = ObjectiveSpec("pareto", ("gsm8k", "mmlu"), ("maximize", "maximize"))
    ranked = lb.rank_rows(rows, spec)
    assert [r.record.trial_id for r in ranked] == [
        "gsm_best",
        "mid",
        "mmlu_best",
        "second",
        "dominated",
        "x",
    ]
    assert [r.front for r in ranked] == [0, 0, 0, 1, 2, None]
    assert [r.on_pareto_front for r in ranked] == [True, True, True, False, False, False]


def test_baseline_gain_compares_with_best_lora_of_same_rank_or_full() -> None:
    rows = _rows(
        record("p8", "plora", 8, gsm8k=0.30),
        record("p4", "plora", 4, gsm8k=0.18),
        record("p2", "plora", 2, gsm8k=0.50),
        record("l8", "lora", 8, gsm8k=0.25),
        record("l4", "lora", 4, gsm8k=0.10),
        record("full", "full", gsm8k=0.20),
        record("l8bad", "lora", 8, "failed"),
    )
    spec = ObjectiveSpec("single", ("gsm8k",), ("maximize",))
    ranked = lb.rank_rows(rows, spec)
    lb.baseline_gains(ranked, spec)
    by = {r.record.trial_id: r for r in ranked}
    assert by["p8"].gain["objective"] == pytest.approx(0.05)  # vs lora r8 (0.25 > full 0.20)
    assert by["p8"].gain_baseline["objective"] == "unit/l8"
    assert by["p4"].gain["objective"] == pytest.approx(-0.02)  # vs full (0.20 > lora r4 0.10)
    assert by["p4"].gain_baseline["objective"] == "unit/full"
    assert by["p2"].gain["objective"] == pytest.approx(0.30)  # no lora r2: full counts
    assert by["l8"].gain == {} and by["full"].gain == {}  # baselines get no gain
    assert by["l8"].is_baseline and by["full"].is_baseline and not by["p8"].is_baseline
    # A minimised objective: lower is better, so a lower PLoRA value is a positive gain.
    spec_min = ObjectiveSpec("single", ("gsm8k",), ("minimize",))
    lb.baseline_gains(lb.rank_rows(rows, spec_min), spec_min)
    assert by["p8"].gain["objective"] == pytest.approx(-0.10)  # 0.30 vs best-min full 0.20


def test_pareto_gain_is_per_metric_against_each_metrics_best_baseline() -> None:
    rows = _rows(
        record("p", "plora", 8, gsm8k=0.3, mmlu=0.4),
        record("l", "lora", 8, gsm8k=0.2, mmlu=0.45),
        record("f", "full", gsm8k=0.25, mmlu=0.3),
    )
    spec = ObjectiveSpec("pareto", ("gsm8k", "mmlu"), ("maximize", "maximize"))
    ranked = lb.rank_rows(rows, spec)
    lb.baseline_gains(ranked, spec)
    p = next(r for r in ranked if r.record.trial_id == "p")
    assert p.gain == pytest.approx({"gsm8k": 0.05, "mmlu": -0.05})
    assert p.gain_baseline == {"gsm8k": "unit/f", "mmlu": "unit/l"}


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    assert lb.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    t = lb.nice_ticks(0.113, 0.471)
    assert t[0] <= 0.113 and t[-1] >= 0.471 and len(t) <= 8
    assert lb.nice_ticks(3.0, 3.0)[0] < 3.0 < lb.nice_ticks(3.0, 3.0)[-1]
    # Every trial scoring 0 (a tiny model on GSM8K): no negative accuracies on the axis.
    assert lb.nice_ticks(0.0, 0.0)[0] == 0.0 and lb.nice_ticks(0.0, 0.0)[-1] > 0


def test_json_for_script_cannot_close_the_script_element() -> None:
    text = lb.json_for_script({"p": "</script><script>alert(1)</script><!--", "q": "\u2028"})
    assert "</" not in text and "<!--" not in text and "\u2028" not in text
    assert json.loads(text) == {"p": "</script><script>alert(1)</script><!--", "q": "\u2028"}


# --------------------------------------------------------------------------- reading records


def test_bad_search_directories_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(lb.LeaderboardError, match="nothing there"):
        lb.build_leaderboard([tmp_path / "missing"])
    (tmp_path / "s").mkdir()
    with pytest.raises(
        lb.LeaderboardError, match=r"/s: expected a search directory \(with search\.json\)"
    ):
        lb.build_leaderboard([tmp_path / "s"])
    (tmp_path / "s" / "search.json").write_text("{not json")
    with pytest.raises(lb.LeaderboardError, match=r"search\.json: not valid JSON"):
        lb.build_leaderboard([tmp_path / "s"])
    assert lb.leaderboard_command([str(tmp_path / "s")], None) == 2
    # An unusable objective is the board's error too, naming the file and the field.
    bad = {"objective": {"metrics": ["gsm8k"], "directions": ["up"]}}
    (tmp_path / "s" / "search.json").write_text(json.dumps(bad))
    with pytest.raises(lb.LeaderboardError, match=r"search\.json: objective\.directions.*'up'"):
        lb.build_leaderboard([tmp_path / "s"])


def test_corrupt_and_invalid_records_are_skipped_and_named(tmp_path: Path) -> None:
    d = small_search(tmp_path, study=False)
    (d / "trials" / "half.json").write_text('{"trial_id": "half", "sta')  # a non-atomic crash
    (d / "trials" / "odd.json").write_text(json.dumps(record("odd", status="paused")))
    (d / "trials" / ".t10.json.tmp").write_text("{")  # an atomic write in progress
    board = lb.build_leaderboard([d])
    assert len(board.rows) == 9
    assert any("half.json: skipped, not valid JSON" in w for w in board.warnings)
    assert any(
        "odd.json: status: expected one of completed" in w and "'paused'" in w
        for w in board.warnings
    )
    assert not any(".tmp" in w for w in board.warnings)


# --------------------------------------------------------------------------- publishing


def published_names(out: Path) -> list[str]:
    """The files a user sees in a board directory (the generations and the pointer are hidden)."""
    return sorted(n for n in os.listdir(out) if not n.startswith("."))


def test_publish_writes_all_files_consistently(tmp_path: Path) -> None:
    d = small_search(tmp_path)
    out = lb.publish(d)
    assert out == d / "leaderboard"
    assert published_names(out) == sorted(lb.OUTPUT_FILES)  # and no temp files left
    data = json.loads((out / "leaderboard.json").read_text())
    assert [r["trial_id"] for r in data["rows"]] == [
        "t1",
        "t4",
        "t2",
        "t6",
        "t3",
        "t5",
        "t7",
        "t8",
        "t9",
    ]
    assert data["best"] == {"search": "unit", "trial_id": "t1"}
    t1 = data["rows"][0]
    assert t1["gain_over_baseline"]["objective"] == pytest.approx(0.05)
    assert t1["params"] == {"lora.rank": 8, "optim.lr": 1e-4, "plora.momentum": 0.1}
    for key in (
        "status",
        "reason",
        "objectives",
        "proxy",
        "final_loss",
        "accelerator_hours",
        "wall_time_s",
        "num_unloads",
        "delta_effective_rank",
        "checkpoint_path",
        "model_path",
        "loss_curve",
    ):
        assert key in t1
    assert data["rows"][-1]["reason"] == "RuntimeError: worker died"
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == [r["trial_id"] for r in data["rows"]]
    assert float(rows[0]["objective.mmlu_stem"]) == pytest.approx(0.42)
    assert rows[0]["param.plora.momentum"] == "0.1"
    assert rows[3]["baseline"] == "True" and rows[3]["method"] == "full"
    md = (out / "leaderboard.md").read_text()
    assert md.count("\n| ") == 1 + 9 and "Best: **unit/t1**" in md
    page = (out / "index.html").read_text()
    assert page.count("<tr ") == 9 and page.count("<svg") == 4


def test_a_search_without_finished_trials_publishes_an_empty_board(tmp_path: Path) -> None:
    """The search may publish before its first trial ends: no rows, no best config, no crash."""
    d = make_search_dir(tmp_path, "fresh", [], study=False)
    os.rmdir(d / "trials")
    out = lb.publish(d)
    assert published_names(out) == sorted(set(lb.OUTPUT_FILES) - {"best_config.yaml"})
    assert json.loads((out / "leaderboard.json").read_text())["rows"] == []
    page = (out / "index.html").read_text()
    assert "no completed trial with an objective yet" in page and page.count("<svg") == 4


def test_cli_default_output_is_the_search_leaderboard_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = small_search(tmp_path / "storage", study=False)
    # A storage root holding one search expands to it; the board goes into that search.
    assert main(["leaderboard", str(tmp_path / "storage")]) == 0
    assert (d / "leaderboard" / "index.html").is_file()
    printed = capsys.readouterr().out
    assert "9 trial(s) from 1 search(es)" in printed and "best: unit/t1 (plora)" in printed


def test_best_config_yaml_is_a_runnable_run_config(tmp_path: Path) -> None:
    out = lb.publish(small_search(tmp_path))
    text = (out / "best_config.yaml").read_text()
    assert text.startswith("# Best configuration") and "plora-ray train best_config.yaml" in text
    assert "search" not in yaml.safe_load(text)
    cfg = load_config(out / "best_config.yaml")
    assert cfg.method == "plora" and cfg.lora.rank == 8 and cfg.plora.momentum == 0.1
    assert cfg.optim.lr == 1e-4 and cfg.search is None


def test_best_config_comment_cannot_inject_yaml_keys(tmp_path: Path) -> None:
    rec = record("x\nmethod: full", gsm8k=0.3, search="evil\nseed: 99")
    d = make_search_dir(tmp_path, "evil\nseed: 99", [rec], study=False, dirname="evil")
    text = (lb.publish(d) / "best_config.yaml").read_text()
    cfg = load_config(d / "leaderboard" / "best_config.yaml")
    assert cfg.method == "plora" and cfg.seed == 0, text


def test_importances_from_the_study_and_graceful_with_too_few_trials(tmp_path: Path) -> None:
    board = lb.build_leaderboard([small_search(tmp_path / "a")])
    imps, why = lb.param_importances(board.searches[0])
    # plora.momentum is conditional (absent from lora/full trials): Optuna rates only the
    # parameters present in every completed trial.
    assert why is None and set(imps["gsm8k"]) == {"lora.rank", "optim.lr"}
    assert sum(imps["gsm8k"].values()) == pytest.approx(1.0)
    one = make_search_dir(tmp_path / "b", "one", [record("only", gsm8k=0.2)])
    board = lb.build_leaderboard([one])
    imps, why = lb.param_importances(board.searches[0])
    assert imps == {} and "at least 2 completed trials" in why
    assert "not available: needs at least 2" in lb.render_html(board)
    # A missing SQLite file is reported, not created.
    nodb = make_search_dir(tmp_path / "c", "nodb", [record("a", gsm8k=0.2)], study=False)
    imps, why = lb.param_importances(lb.build_leaderboard([nodb]).searches[0])
    assert "does not exist" in why and not (nodb / "study.db").exists()


def test_atomic_write_failure_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "board" / "index.html"
    atomic_write(target, [b"old ", b"board"])
    assert target.read_text() == "old board"

    def crashing() -> Any:
        yield b"new half"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crashing())
    assert target.read_text() == "old board"
    assert os.listdir(target.parent) == ["index.html"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # readable like any published file


def test_killed_publisher_leaves_complete_files(tmp_path: Path) -> None:
    """A search driver killed (SIGKILL) while publishing leaves every file whole and readable."""
    recs = [
        record(
            f"t{i:03d}",
            "plora" if i % 3 else "lora",
            8,
            gsm8k=(i % 17) / 20,
            mmlu=(i % 11) / 12,
            minute=i,
        )
        for i in range(150)
    ]
    d = make_search_dir(tmp_path, "big", recs, study=False)
    lb.publish(d)
    code = "import sys\nfrom plora_ray.leaderboard import publish\nwhile True: publish(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(d)])
    try:
        time.sleep(3.0)
    finally:
        proc.kill()
        proc.wait()
    out = d / "leaderboard"
    assert published_names(out) == sorted(lb.OUTPUT_FILES)
    assert len(json.loads((out / "leaderboard.json").read_text())["rows"]) == 150
    assert (out / "index.html").read_text().rstrip().endswith("</html>")
    assert len((out / "leaderboard.csv").read_text().splitlines()) == 151
    assert load_config(out / "best_config.yaml").method == "plora"


def test_stale_temp_files_of_a_killed_writer_are_cleaned_up(tmp_path: Path) -> None:
    d = small_search(tmp_path, study=False)
    out = lb.publish(d)
    old, fresh = out / ".index.html.abc123.tmp", out / ".leaderboard.json.def456.tmp"
    old.write_text("<html><body>half")
    fresh.write_text("{")  # may belong to a publisher running right now: left alone
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    lb.publish(d)
    assert not old.exists() and fresh.exists()


def test_merge_two_searches_keeps_every_entry_and_names_its_search(tmp_path: Path) -> None:
    a = small_search(tmp_path / "r1", "alpha")
    b = make_search_dir(
        tmp_path / "r2",
        "beta",
        [
            record("t1", "plora", 8, gsm8k=0.50, mmlu=0.3, search="beta", minute=2),
            record("t2", "lora", 8, gsm8k=0.45, mmlu=0.3, search="beta", minute=3),
        ],
    )
    out = tmp_path / "merged"
    assert lb.leaderboard_command([str(a), str(b)], str(out)) == 0
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["ranked_globally"] is True
    assert len(data["rows"]) == 11
    assert {(r["search"], r["trial_id"]) for r in data["rows"]} == (
        {("alpha", f"t{i}") for i in range(1, 10)} | {("beta", "t1"), ("beta", "t2")}
    )
    assert [(r["search"], r["trial_id"]) for r in data["rows"][:3]] == [
        ("beta", "t1"),
        ("beta", "t2"),
        ("alpha", "t1"),
    ]
    # beta's PLoRA r8 is compared with the best r8 baseline of both searches (beta/t2).
    assert data["rows"][0]["gain_baseline"]["objective"] == "beta/t2"
    page = (out / "index.html").read_text()
    assert page.count("<tr ") == 11 and ">alpha<" in page and ">beta<" in page
    # The same search given twice is read once; a storage root expands to its searches.
    assert lb.leaderboard_command([str(tmp_path / "r1"), str(a)], str(out)) == 0
    assert len(json.loads((out / "leaderboard.json").read_text())["rows"]) == 9


def test_merge_of_searches_with_different_objectives_ranks_each_by_its_own(tmp_path: Path) -> None:
    a = small_search(tmp_path / "r1", "by_gsm8k", study=False)
    b = make_search_dir(
        tmp_path / "r2",
        "by_pareto",
        [
            record("p1", gsm8k=0.1, mmlu=0.5),
            record("p2", gsm8k=0.4, mmlu=0.2),
            record("p3", gsm8k=0.05, mmlu=0.1),
        ],
        objective={"metrics": ["gsm8k", "mmlu"], "directions": ["max", "max"], "pareto": True},
        study=False,
    )
    board = lb.build_leaderboard([a, b])
    assert not board.ranked_globally
    assert [r.search for r in board.rows] == ["by_gsm8k"] * 9 + ["by_pareto"] * 3
    assert [(r.record.trial_id, r.rank, r.front) for r in board.rows[9:]] == [
        ("p2", 1, 0),
        ("p1", 2, 0),
        ("p3", 3, 1),
    ]


def test_same_search_name_in_two_storages_is_kept_apart(tmp_path: Path) -> None:
    a = make_search_dir(tmp_path / "r1", "smoke", [record("t1", gsm8k=0.2)], study=False)
    b = make_search_dir(tmp_path / "r2", "smoke", [record("t1", gsm8k=0.3)], study=False)
    board = lb.build_leaderboard([a, b])
    assert [r.label for r in board.rows] == ["smoke#2/t1", "smoke/t1"]


def test_cloud_storage_code_path_via_pyarrow_filesystem(tmp_path: Path) -> None:
    """The object-store branch (one PUT per file) on pyarrow's local filesystem."""
    store = Store(str(tmp_path / "bucket"), filesystem=pafs.LocalFileSystem())
    store.write_atomic("leaderboard/index.html", [b"<html>", b"</html>"])
    assert store.read_text("leaderboard", "index.html") == "<html></html>"
    assert store.list_names("leaderboard") == ["index.html"]
    assert store.is_dir("leaderboard") and not store.exists("nothing")
    # A file:// URI is a local path and goes through the temp-file + rename path.
    d = small_search(tmp_path / "uri", study=False)
    assert lb.publish(f"file://{d}") == d / "leaderboard"


def test_user_text_is_escaped_in_html_markdown_and_csv(tmp_path: Path) -> None:
    evil = "<script>window.__pwned=1</script>"
    rec = record(
        "t<b>1",
        gsm8k=0.3,
        reason=evil,
        params={"lora.rank": 8, "tag": evil, "formula": '=HYPERLINK("x")'},
    )
    d = make_search_dir(tmp_path, "s<i>x", [rec], study=False)
    out = lb.publish(d)
    page = (out / "index.html").read_text()
    assert "window.__pwned" in page and "<script>window" not in page
    assert "t<b>1" not in page and "s<i>x" not in page
    assert page.count("<script") == 2  # the JSON data block and the sorting script, nothing else
    md = (out / "leaderboard.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md
    with open(out / "leaderboard.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["param.formula"].startswith("'=")


def test_nan_objectives_do_not_break_the_board(tmp_path: Path) -> None:
    rec = record("t1", gsm8k=0.3)
    rec["final_loss"] = float("nan")
    rec["proxy"] = float("inf")
    d = make_search_dir(tmp_path, "s", [rec, record("t2", gsm8k=0.1)], study=False)
    out = lb.publish(d)
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["rows"][0]["final_loss"] is None and math.isfinite(data["rows"][1]["final_loss"])


# --------------------------------------------------------------------------- a real smoke search


def _board_is_one_generation(out: Path) -> int:
    """The rows of the board users read at ``out``; every file must be of that same board."""
    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert len((out / "leaderboard.csv").read_text().splitlines()) == len(rows) + 1
    page = (out / "index.html").read_text()
    assert page.rstrip().endswith("</html>")
    assert all(html.escape(r["trial_id"]) in page for r in rows)
    return len(rows)


@pytest.mark.parametrize("point", ["files", "generation", "swap"])
def test_publisher_killed_at_any_point_leaves_one_whole_board_and_the_next_publish_cleans_up(
    tmp_path: Path, point: str
) -> None:
    old = [record(f"t{i}", "plora", 8, gsm8k=i / 10, minute=i) for i in range(3)]
    d = make_search_dir(tmp_path, "kill", old, study=False)
    lb.publish(d)
    for i in range(3, 7):  # four more trials finish; the publisher is killed publishing them
        rec = record(f"t{i}", "plora", 8, gsm8k=i / 10, minute=i)
        (d / "trials" / f"t{i}.json").write_text(json.dumps(rec))
    code = "import sys\nfrom plora_ray.leaderboard import publish\npublish(sys.argv[1])"
    env = {**os.environ, lb.PUBLISH_EXIT_ENV: point}
    proc = subprocess.run([sys.executable, "-c", code, str(d)], env=env, timeout=120)
    assert proc.returncode == 86  # it stopped where the hook said
    out = d / "leaderboard"
    # Before the swap the old board is published, after it the new one: whole either way.
    assert _board_is_one_generation(out) == (7 if point == "swap" else 3)
    gens = out / lb.GENERATIONS_DIR
    if point == "files":
        assert any(n.startswith(".partial-") for n in os.listdir(gens))
    lb.publish(d)
    assert _board_is_one_generation(out) == 7
    assert published_names(out) == sorted(lb.OUTPUT_FILES)
    # The killed publisher's partial generation is gone at once (its pid is dead), and only
    # the published generation and the one before it stay.
    left = os.listdir(gens)
    assert not any(n.startswith(".partial-") for n in left), left
    assert len(left) <= 2 and os.readlink(out / lb.CURRENT_LINK).endswith(max(left))
    assert not [n for n in os.listdir(out) if n.startswith(lb.CURRENT_LINK + "-")]


@pytest.mark.parametrize("brk", ["\u2028", "\u2029", "\u0085", "\r\n"])
def test_a_search_name_with_a_yaml_line_break_stays_inside_its_comment(
    tmp_path: Path, brk: str
) -> None:
    recs = [record("t1", "plora", 8, gsm8k=0.5)]
    d = make_search_dir(tmp_path, f"x{brk}injected: 1", recs, study=False, dirname="odd")
    out = lb.publish(d)
    text = (Path(out) / "best_config.yaml").read_text()
    assert set(yaml.safe_load(text)) == set(recs[0]["config"]) - {"search"}
    assert brk not in text


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_smoke_search(tmp_path_factory)


@pytest.mark.slow
def test_board_from_a_real_finished_smoke_search(smoke_search: Path, tmp_path: Path) -> None:
    d = smoke_search
    records = {p.stem: json.loads(p.read_text()) for p in (d / "trials").glob("*.json")}
    assert len(records) >= 2
    meta = json.loads((d / "search.json").read_text())
    # The search published the board itself (after each trial and at its end).
    published = d / "leaderboard"
    assert set(lb.OUTPUT_FILES) <= set(os.listdir(published))
    data = json.loads((published / "leaderboard.json").read_text())
    assert {r["trial_id"] for r in data["rows"]} == set(records)
    assert [r["rank"] for r in data["rows"]] == list(range(1, len(records) + 1))
    # Rebuilt with the CLI: the same trials in the same order.
    assert main(["leaderboard", str(d), "--out", str(tmp_path / "board")]) == 0
    again = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    assert [r["trial_id"] for r in again["rows"]] == [r["trial_id"] for r in data["rows"]]
    # Ranking follows the search's own objective.
    spec = ObjectiveSpec.from_dict(meta, "search.json")
    done = [r for r in data["rows"] if r["status"] == "completed"]
    assert done, "the smoke search should complete at least one trial"
    if spec.pareto:
        assert done[0]["pareto_front"] and all(
            not r["pareto_front"] for r in done if r["front"] and r["front"] > 0
        )
    else:
        vals = [records[r["trial_id"]]["objective_value"] for r in done]
        assert vals == sorted(vals, reverse=spec.scalar_direction == "maximize")
    # The fixed points: a PLoRA r8 trial compared with the LoRA r8 baseline.
    plora8 = [r for r in done if r["method"] == "plora" and r["lora_rank"] == 8]
    lora8 = [r for r in done if r["method"] == "lora" and r["lora_rank"] == 8]
    assert plora8 and lora8, [(r["method"], r["lora_rank"], r["status"]) for r in data["rows"]]
    if not spec.pareto:
        sign = 1.0 if spec.scalar_direction == "maximize" else -1.0
        best_lora8 = max(lora8, key=lambda r: sign * r["score"])
        assert plora8[0]["gain_over_baseline"]["objective"] == pytest.approx(
            sign * (plora8[0]["score"] - best_lora8["score"])
        )
        assert plora8[0]["gain_baseline"]["objective"] == f"smoke/{best_lora8['trial_id']}"
    for row in data["rows"]:
        rec = records[row["trial_id"]]
        assert row["status"] == rec["status"] and row["params"] == rec["params"]
        assert row["baseline"] == (rec["method"] in ("lora", "full"))
        if rec["status"] == "completed":
            assert row["objectives"]["gsm8k"] == rec["objectives"]["gsm8k"]
            assert row["objectives"]["mmlu_stem"] == rec["objectives"]["mmlu_stem"]
            assert row["final_loss"] is not None and row["wall_time_s"] > 0
            assert row["model_path"] and row["loss_curve"]
    # The best config is the best trial's run config and loads as a run config.
    best = records[data["best"]["trial_id"]]
    cfg = load_config(published / "best_config.yaml")
    expected = config_from_dict({k: v for k, v in best["config"].items() if k != "search"})
    assert cfg.to_dict() == expected.to_dict()
    with open(published / "leaderboard.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(records)
    page = (published / "index.html").read_text()
    assert page.count("<tr ") == len(records)


# --------------------------------------------------------------------------- cost, caveats, schema


def test_total_cost_and_time_to_best_in_summary_markdown_and_json(tmp_path: Path) -> None:
    recs = [
        record("a", gsm8k=0.1, minute=1, accelerator_hours=0.5),
        record("b", gsm8k=0.3, minute=3, accelerator_hours=0.25),  # the best: ends at 2:55
        record("c", status="failed", minute=5, accelerator_hours=None, started_at=None),
    ]
    d = make_search_dir(tmp_path, "unit", recs, study=False)
    out = lb.publish(d)
    data = json.loads((out / "leaderboard.json").read_text())
    want = {
        "num_trials": 3,
        "accelerator_hours": pytest.approx(0.75),
        "wall_time_s": pytest.approx(56.0 + 58.0 + 60.0),
        "time_to_best_s": pytest.approx(2 * 60 + 55.0),
        "best": "unit/b",
    }
    assert data["cost"] == want and data["searches"][0]["cost"] == want
    sentence = (
        "Total cost: 0.75 accelerator-hours, 2:54 of trial wall time over 3 trial(s); "
        "time to best: 2:55 (from the search's first trial start to the end of unit/b)."
    )
    assert sentence in (out / "leaderboard.md").read_text()
    page = (out / "index.html").read_text()
    assert f'<p class="cost">{html.escape(sentence)}</p>' in page
    # No trial reports accelerator-hours: unknown, not zero.
    none = make_search_dir(
        tmp_path / "n", "n", [record("x", gsm8k=0.2, accelerator_hours=None)], study=False
    )
    board = lb.build_leaderboard([none])
    assert board.cost.accelerator_hours is None
    assert "accelerator-hours not reported" in lb.render_markdown(board)


def _svg(page: str, plot_id: str) -> str:
    start = page.index(f'id="{plot_id}"')
    return page[page.rindex("<svg", 0, start) : page.index("</svg>", start)]


def test_importances_from_fewer_than_ten_trials_carry_a_caveat(tmp_path: Path) -> None:
    page = lb.render_html(lb.build_leaderboard([small_search(tmp_path / "few")]))
    few = _svg(page, "plot-importance-unit")
    assert 'class="bar"' in few
    assert "Caveat: from only 6 completed trials (fewer than 10)" in few
    many = [
        record(f"m{i}", gsm8k=0.1 + 0.03 * i, params={"optim.lr": 1e-4 * (i + 1), "x": 1 + i % 3})
        for i in range(10)
    ]
    d = make_search_dir(tmp_path / "many", "many", many)
    svg = _svg(lb.render_html(lb.build_leaderboard([d])), "plot-importance-many")
    assert 'class="bar"' in svg and "Caveat" not in svg


def test_plots_of_equal_values_or_one_point_give_a_reason_instead(tmp_path: Path) -> None:
    zeros = [record(f"z{i}", gsm8k=0.0, mmlu=0.0, minute=i + 1) for i in range(3)]
    page = lb.render_html(
        lb.build_leaderboard([make_search_dir(tmp_path, "z", zeros, study=False)])
    )
    pareto = _svg(page, "plot-pareto")
    assert 'class="plot empty"' in pareto and 'class="pt"' not in pareto
    assert "GSM8K is 0 and MMLU is 0 in all 3 completed trials" in pareto
    one = make_search_dir(tmp_path / "one", "one", [record("o", gsm8k=0.2, mmlu=0.3)], study=False)
    page = lb.render_html(lb.build_leaderboard([one]))
    for plot_id in ("plot-objective-time", "plot-pareto"):
        svg = _svg(page, plot_id)
        assert 'class="plot empty"' in svg and "only 1 completed trial" in svg, plot_id


def _documented_fields(doc: str) -> dict[str, str]:
    """``field -> type`` from the table rows of docs/leaderboard_json.md."""
    fields = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            fields[cells[0].strip("`")] = cells[1]
    return fields


def _written_fields(v: Any, prefix: str, documented: dict[str, str], out: set[str]) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            if not documented.get(path, "").startswith("map"):  # keys are names, not fields
                _written_fields(x, path, documented, out)
    elif isinstance(v, list):
        for x in v:
            _written_fields(x, f"{prefix}[]", documented, out)


def test_leaderboard_json_is_version_2_and_every_field_is_documented(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[1] / "docs" / "leaderboard_json.md").read_text()
    documented = _documented_fields(doc)
    a = small_search(tmp_path / "r1", "alpha", study=False)
    b = make_search_dir(
        tmp_path / "r2",
        "beta",
        [record("p1", gsm8k=0.1, mmlu=0.5, run_dir=str(tmp_path / "r2" / "beta" / "runs" / "p1"))],
        objective={"metrics": ["gsm8k", "mmlu"], "directions": ["max", "max"], "pareto": True},
        study=False,
    )
    out = tmp_path / "merged"
    assert lb.leaderboard_command([str(a), str(b)], str(out)) == 0
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["format"] == "plora-ray leaderboard" and data["version"] == 2
    assert "**version 2**" in doc
    written: set[str] = set()
    _written_fields(data, "", documented, written)
    assert sorted(written - set(documented)) == []  # every key written is documented
    assert sorted(set(documented) - written) == []  # and every documented key is written
    p1 = next(r for r in data["rows"] if r["trial_id"] == "p1")
    assert p1["metrics_path"] == str(tmp_path / "r2" / "beta" / "runs" / "p1" / "metrics.jsonl")


# --------------------------------------------------------------------------- pbt_unload lineage


def _pbt_search(root: Path, parent: str = "p2") -> Path:
    """A pbt_unload search: the winner w1 forked from ``parent`` (p2) at stage 2 with a perturbed
    LR; p2 never forked."""
    start = {"optim.lr": 1e-3, "plora.momentum": 0.1, "lora.rank": 8}
    stages = [{"at": 2, "optim.lr": 0.0036}]
    lineage = [
        {"stage": 0, "step": 0, "samples": 0, "trial": parent, "parent": None,
         "parent_proxy": None, "proxy": None, "settings": dict(start), "changes": {}},
        {"stage": 2, "step": 16, "samples": 128, "trial": "w1", "parent": parent,
         "parent_proxy": 3.41, "proxy": 3.87, "settings": {"optim.lr": 0.0036},
         "changes": {"optim.lr": "* 1.2"}},
    ]  # fmt: skip
    winner = record("w1", gsm8k=0.3, params={**start, "plora.stages": stages}, lineage=lineage)
    p2 = record("p2", gsm8k=0.2, params=dict(start), lineage=[dict(lineage[0])])
    return make_search_dir(root, "pbt", [winner, p2], study=False)


def test_pbt_board_shows_the_lineage_in_every_format_and_best_config_replays_the_stages(
    tmp_path: Path,
) -> None:
    out = lb.publish(_pbt_search(tmp_path))
    data = json.loads((out / "leaderboard.json").read_text())
    rows = {r["trial_id"]: r for r in data["rows"]}
    assert [e["parent"] for e in rows["w1"]["lineage"]] == [None, "p2"]
    assert rows["p2"]["lineage"][0]["trial"] == "p2"
    page = (out / "index.html").read_text()
    assert "<h2>Lineage</h2>" in page
    section = page.split("<h2>Lineage</h2>", 1)[1].split("<h2>", 1)[0]
    assert section.index("w1") < section.index("p2")  # the board's order: the winner first
    assert "optim.lr=0.0036 (* 1.2)" in section and "3.41" in section and "(start)" in section
    md = (out / "leaderboard.md").read_text()
    assert "## Lineage" in md and "took the unload checkpoint of p2 (proxy 3.41)" in md
    with open(out / "leaderboard.csv", newline="") as f:
        csv_rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert csv_rows["w1"]["lineage"] == "s0 p2; s2 w1<-p2 optim.lr=0.0036 (* 1.2)"
    text = (out / "best_config.yaml").read_text()
    assert "# lineage (pbt_unload)" in text and "#   stage 2 (step 16, 128 samples)" in text
    cfg = load_config(out / "best_config.yaml")
    assert cfg.optim.lr == 1e-3
    assert cfg.plora.stages == [{"at": 2, "optim.lr": 0.0036}]


def test_a_board_without_forks_has_no_lineage_section(tmp_path: Path) -> None:
    out = lb.publish(small_search(tmp_path))
    assert "Lineage" not in (out / "index.html").read_text()
    assert "## Lineage" not in (out / "leaderboard.md").read_text()
    assert "lineage" not in (out / "best_config.yaml").read_text()
    with open(out / "leaderboard.csv", newline="") as f:
        assert "lineage" not in next(csv.reader(f))


@pytest.mark.parametrize("brk", ["\u2028", "\n"])
def test_lineage_text_is_escaped_and_cannot_break_out_of_its_comment(
    tmp_path: Path, brk: str
) -> None:
    evil = f"<script>window.__pwned=1</script>{brk}seed: 99"
    out = lb.publish(_pbt_search(tmp_path, parent=evil))
    page = (out / "index.html").read_text()
    assert "<script>window" not in page and page.count("<script") == 2
    assert load_config(out / "best_config.yaml").seed == 0
    assert "<script>window" not in (out / "leaderboard.md").read_text()
