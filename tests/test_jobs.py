"""jobs/: the smoke search submitted with `ray job submit` (jobs/smoke.sh) to a real local Ray
head on loopback, waited for, and its finished trials and published results checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from ray_helpers import ROOT, load_records, smoke_job_search

TERMINAL = {"completed", "early_stopped", "diverged", "failed"}


def test_job_scripts_are_valid_bash_and_name_their_space() -> None:
    for space in ("smoke", "smoke_pbt", "paper_table1", "llama7b_plora"):
        script = ROOT / "jobs" / f"{space}.sh"
        assert os.access(script, os.X_OK), script
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert "ray job submit" in text and f"search_spaces/{space}.yaml" in text
        assert 'RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"' in text
        assert "PLORA_STORAGE" in text and "--runtime-env jobs/runtime_env.yaml" in text
    import yaml

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])


def _submit_env(tmp_path, **env: str) -> dict[str, str]:
    """What jobs/submit_env.sh decides, for a HOME of its own and the given variables."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"
    }
    out = subprocess.run(
        ["bash", "-c", 'source jobs/submit_env.sh; echo "${RAY_AUTH_MODE:-}|$submit_python"'],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**base, "HOME": str(tmp_path), **env},
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    mode, python = out.stdout.strip().split("|")
    return {"mode": mode, "python": python}


def test_submission_sends_the_token_ray_start_would_use(tmp_path) -> None:
    # No token anywhere: ray start --head runs without auth, so nothing is sent.
    assert _submit_env(tmp_path)["mode"] == ""
    assert _submit_env(tmp_path, RAY_AUTH_TOKEN="abc")["mode"] == "token"
    (tmp_path / "tok").write_text("abc")
    assert _submit_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(tmp_path / "tok"))["mode"] == "token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc")
    assert _submit_env(tmp_path)["mode"] == "token"
    # This machine's own token is not sent to another address unless named (as in Ray).
    assert _submit_env(tmp_path, RAY_ADDRESS="http://10.0.0.5:8265")["mode"] == ""
    remote = _submit_env(tmp_path, RAY_ADDRESS="http://10.0.0.5:8265", RAY_AUTH_TOKEN="abc")
    assert remote["mode"] == "token"
    # A mode chosen by the user stays.
    assert _submit_env(tmp_path, RAY_AUTH_MODE="disabled")["mode"] == "disabled"


def test_job_entrypoint_runs_the_project_python_or_fails_in_one_line(tmp_path) -> None:
    entry = ROOT / "jobs" / "entrypoint.sh"
    assert os.access(entry, os.X_OK)
    bash = shutil.which("bash") or "/bin/bash"
    # The submitter's interpreter is used even when the node's PATH has no Python with Ray.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("PLORA_PYTHON", None)
    ok = subprocess.run(
        [bash, str(entry), sys.executable, "--version"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("plora-ray "), ok.stderr
    bad = subprocess.run(
        [bash, str(entry), str(tmp_path / "no-python"), "--version"],
        capture_output=True,
        text=True,
        env={**env, "PATH": str(tmp_path)},
        cwd=tmp_path,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("plora-ray job: no Python on ")
    assert "PLORA_PYTHON" in bad.stderr and "ModuleNotFoundError" not in bad.stderr


@pytest.mark.slow
def test_smoke_search_submitted_as_a_ray_job_finishes_and_publishes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # The session's one smoke search (tests/ray_helpers.py): jobs/smoke.sh against a loopback
    # head of our own, shrunk with --set to 4 trials of 4 steps; the leaderboard tests reuse it.
    job = smoke_job_search(tmp_path_factory)
    log, sdir = job.log, job.search_dir
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    search = json.loads((sdir / "search.json").read_text())
    assert search["name"] == "smoke" and search["metrics"] == ["gsm8k_nll"]
    records = load_records(sdir)
    assert len(records) == 4
    assert {r["status"] for r in records} <= TERMINAL
    assert any(r["status"] == "completed" for r in records)
    for r in records:
        assert r["search"] == "smoke" and r["config"]["train"]["max_steps"] == 4
        assert r["method"] in ("plora", "lora") and r["params"]["method"] == r["method"]
        if r["status"] == "completed":
            assert r["objectives"]["gsm8k_nll"] > 0 and r["objective_value"] is not None
            assert r["loss_curve"] and r["wall_time_s"] > 0
        # One summary line per finished trial in the job's output.
        assert f"[trial {r['trial_id']}] {r['status']}" in log
    assert (sdir / "study.db").is_file()
    # The study agrees with the records: completed -> COMPLETE with its value, stopped by ASHA ->
    # PRUNED, failed/diverged -> FAIL.
    import optuna

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{sdir / 'study.db'}")
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    state_of = {
        "completed": optuna.trial.TrialState.COMPLETE,
        "early_stopped": optuna.trial.TrialState.PRUNED,
        "diverged": optuna.trial.TrialState.FAIL,
        "failed": optuna.trial.TrialState.FAIL,
    }
    for r in records:
        assert by_tune[r["trial_id"]].state == state_of[r["status"]], (r["status"], r["reason"])
        if r["status"] == "completed":
            assert by_tune[r["trial_id"]].value == r["objective_value"]
    board = sdir / "leaderboard"
    assert board.is_dir() and any(board.iterdir()), "leaderboard not published"
