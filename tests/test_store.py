"""The search directory's files: the atomic writer, the metrics reader, the trial record."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from plora_ray.objective import ObjectiveSpec
from plora_ray.store import (
    METRICS_FILE,
    RecordError,
    SearchDir,
    Store,
    TrialRecord,
    atomic_write,
    atomic_write_json,
    read_metrics,
)
from plora_ray.trial_record import build_record, study_user_attrs


def test_atomic_write_respects_the_umask_so_team_storage_stays_readable(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "search.json", {"name": "x"})
        group = os.umask(0o002)
        try:
            shared = atomic_write(tmp_path / "other.txt", [b"a"])
        finally:
            os.umask(group)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o664
    assert json.loads(Path(path).read_text()) == {"name": "x"}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "board.json"
    target.write_text("old")

    def chunks():
        yield b"half"
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        atomic_write(target, chunks())
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.json"]


def test_stale_temps_of_a_killed_writer_are_removed_young_ones_kept(tmp_path: Path) -> None:
    old = tmp_path / ".index.html.abc.tmp"
    young = tmp_path / ".index.html.def.tmp"
    other = tmp_path / ".unrelated.tmp"
    for p in (old, young, other):
        p.write_text("x")
    os.utime(old, (1, 1))
    Store(tmp_path).remove_stale_temps(["index.html"], max_age_s=60)
    assert not old.exists() and young.exists() and other.exists()


def test_read_metrics_skips_a_line_cut_by_a_kill_and_reads_a_run_dir(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n\n[1, 2]\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    want = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert read_metrics(tmp_path) == want
    assert read_metrics(tmp_path / "metrics.jsonl") == want
    assert read_metrics(tmp_path / "missing") == []


def test_trial_record_round_trips_and_drops_unusable_optional_values() -> None:
    raw = {
        "trial_id": "abc",
        "status": "completed",
        "params": {"lora.rank": 4},
        "config": {"method": "plora", "lora": {"rank": 4}},
        "objectives": {"gsm8k": 0.25, "mmlu": float("nan"), "bad": "x"},
        "proxy": float("inf"),
        "loss_curve": [[1, 2.0], [2, "x"], [3]],
        "timeline": {"driver_pid": 7},
    }
    rec = TrialRecord.from_dict(raw, "trials/abc.json")
    assert rec.method == "plora" and rec.lora_rank == 4
    assert rec.objectives == {"gsm8k": 0.25}
    assert rec.proxy is None
    assert rec.loss_curve == [[1.0, 2.0]]
    again = TrialRecord.from_dict(json.loads(json.dumps(rec.to_dict())), "again")
    assert again == rec


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ([], "expected a JSON object"),
        ({"status": "completed"}, "trial_id"),
        ({"trial_id": "a", "status": "running"}, "status: expected one of"),
        ({"trial_id": "a", "status": "failed", "params": [1]}, "params"),
    ],
)
def test_an_unusable_trial_record_is_refused_naming_file_and_field(
    raw: object, needle: str
) -> None:
    with pytest.raises(RecordError, match="trials/a.json") as err:
        TrialRecord.from_dict(raw, "trials/a.json")
    assert needle in str(err.value)


def test_search_dir_reads_back_finished_records_oldest_first(tmp_path: Path) -> None:
    sdir = SearchDir(str(tmp_path), "s")
    assert not sdir.exists()
    sdir.write_json("search.json", {"name": "s"})
    later = TrialRecord("b", "completed", ended_at="2026-01-02T00:00:00+00:00")
    earlier = TrialRecord("a", "failed", reason="boom", ended_at="2026-01-01T00:00:00+00:00")
    sdir.write_record(later)
    sdir.write_record(earlier)
    (tmp_path / "s" / "trials" / "broken.json").write_text("{")
    assert sdir.exists()
    assert [r.trial_id for r in sdir.records()] == ["a", "b"]
    assert sdir.trial_record("a") == earlier
    assert sdir.trial_record("missing") is None
    assert sdir.run_dir("a") == str(tmp_path / "s" / "runs" / "a")


def test_a_merge_warning_in_the_final_report_reaches_the_trial_record(tmp_path: Path) -> None:
    """The trainer's final metrics line carries the run's merge-error warning; the trial record
    (and so the leaderboard's JSON and the study's attrs) keeps it, and a record without one
    reads back as None."""
    warning = "merge error 0.77 per unload exceeds 0.05: set plora.merge_rounding: from_base"
    lines = [
        {"step": 2, "loss": 7.6, "unload": True, "merge_rel_error": 0.77},
        {"final": True, "status": "completed", "merge_warning": warning},
    ]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in lines))

    def record(trial_id: str) -> TrialRecord:
        return build_record(
            trial_id=trial_id,
            search="s",
            objective=ObjectiveSpec("single", ("final_loss",), ("minimize",)),
            proxy_metric="gsm8k_nll",
            params={},
            config={"method": "plora"},
            status="completed",
            reason=None,
            run_dir=str(tmp_path),
            started=0.0,
        )

    rec = record("t1")
    assert rec.merge_warning == warning
    assert TrialRecord.from_dict(rec.to_dict(), "t1.json").merge_warning == warning
    assert study_user_attrs(rec)["merge_warning"] == warning
    (tmp_path / METRICS_FILE).write_text(json.dumps(lines[0]) + "\n")
    quiet = record("t2")
    assert quiet.merge_warning is None and "merge_warning" not in quiet.to_dict()
