"""The Optuna study of a real finished smoke search (the session's one, submitted as a job) as a
record: metric names, states and values, the proxy as intermediate values, user attrs that agree
with the trial records; optuna-dashboard serving it on loopback; the job's quiet console."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from ray_helpers import finished_smoke_search, free_port, load_records, smoke_job_search

from plora_ray.store import read_metrics

pytestmark = pytest.mark.slow

STATE_OF = {
    "completed": optuna.trial.TrialState.COMPLETE,
    "early_stopped": optuna.trial.TrialState.PRUNED,
    "diverged": optuna.trial.TrialState.FAIL,
    "failed": optuna.trial.TrialState.FAIL,
}


@pytest.fixture(scope="module")
def smoke_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_smoke_search(tmp_path_factory)


def _storage(search_dir: Path) -> str:
    return f"sqlite:///{search_dir / 'study.db'}"


def test_the_study_holds_each_trial_as_its_record_says(smoke_search: Path) -> None:
    study = optuna.load_study(study_name="smoke", storage=_storage(smoke_search))
    # optuna-dashboard names the value by the objective, not "Objective 0".
    assert study.metric_names == ["gsm8k_nll"]
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    records = load_records(smoke_search)
    assert records
    for rec in records:
        t = by_tune[rec["trial_id"]]
        assert t.state == STATE_OF[rec["status"]], (rec["status"], t.state)
        attrs = t.user_attrs
        assert attrs["status"] == rec["status"]
        for key in ("objectives", "objective_value", "model_path", "run_dir", "reason", "proxy"):
            assert attrs[key] == rec[key], key
        assert attrs["wall_time_s"] == pytest.approx(rec["wall_time_s"], abs=1.0)
        assert attrs["accelerator_hours"] == pytest.approx(rec["accelerator_hours"], abs=1e-3)
        if rec["status"] == "completed":
            assert t.value == pytest.approx(rec["objective_value"])
            assert Path(attrs["model_path"]).is_dir()
        # The proxy at each proxy point the trainer reported, at its step.
        points = {
            m["step"]: m["gsm8k_nll"]
            for m in read_metrics(Path(rec["run_dir"]) / "metrics.jsonl")
            if m.get("proxy_point") and m.get("status") == "running"
        }
        assert points, rec["run_dir"]
        assert t.intermediate_values == pytest.approx(points)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_the_search_console_is_short_and_ends_with_the_best_trial_and_leaderboard(
    tmp_path_factory: pytest.TempPathFactory, smoke_search: Path
) -> None:
    log = smoke_job_search(tmp_path_factory).log
    lines = log.splitlines()
    # 4 trials: a line each, a table or two, the totals; `ray job submit`'s own lines. Before:
    # Tune's tables and every worker's progress bars and warnings, hundreds of lines.
    assert len(lines) < 60, log
    for rec in load_records(smoke_search):
        assert f"[trial {rec['trial_id']}] {rec['status']}" in log
    assert "it/s]" not in log and "warnings.warn" not in log, log
    best = min(
        (r for r in load_records(smoke_search) if r["objective_value"] is not None),
        key=lambda r: r["objective_value"],
    )
    assert f"best trial {best['trial_id']}: gsm8k_nll = " in log, log
    assert f"leaderboard: {smoke_search}/leaderboard/index.html" in log, log


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_optuna_dashboard_serves_the_finished_smoke_study(smoke_search: Path) -> None:
    exe = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("optuna-dashboard is not installed (pip install '.[dashboard]'; CI has it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, _storage(smoke_search), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        studies = None
        while time.time() < deadline:
            try:
                studies = _get_json(f"{base}/api/studies")
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.3)
        assert studies is not None, "optuna-dashboard did not answer within 60 s"
        (summary,) = [s for s in studies["study_summaries"] if s["study_name"] == "smoke"]
        detail = _get_json(f"{base}/api/studies/{summary['study_id']}")
        assert detail["objective_names"] == ["gsm8k_nll"]
        records = {r["trial_id"]: r for r in load_records(smoke_search)}
        seen = 0
        for trial in detail["trials"]:
            attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
            rec = records.get(attrs.get("tune_trial_id"))
            if rec is None or rec["status"] != "completed":
                continue
            assert trial["state"] == "Complete"
            assert trial["values"] == [pytest.approx(rec["objective_value"])]
            assert attrs["status"] == "completed"
            assert trial["intermediate_values"], trial
            seen += 1
        assert seen >= 1, detail["trials"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
