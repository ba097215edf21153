"""pbt_unload end to end (slow): the shrunk smoke_pbt search on a loopback Ray head through the
CLI, its driver SIGKILLed after the first fork and resumed, then the board's lineage and the
replay of a forked trial's per-stage schedule with `plora-ray train`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray_helpers as helpers  # tests/ is on sys.path (rootdir conftest-less layout)
import yaml

SPACE = helpers.ROOT / "search_spaces" / "smoke_pbt.yaml"
# smoke_pbt shrunk to CI's budget: 3 trials of 12 steps with an unload every 2 (6 stages, fork
# points at the first 5), a population of 3 on 2 CPUs (so Tune's PBT also pauses and resumes
# trials), the bottom half forking at each unload; evaluation cut to the proxy's task.
PBT_SETS = [
    "search.num_samples=3",
    "search.scheduler.quantile_fraction=0.5",
    "train.max_steps=12",
    "plora.unload_every=16",
    "data.max_samples=96",
    "eval.tasks=[gsm8k]",
    "eval.num_fewshot={gsm8k: 0}",
    "eval.limit=2",
    "eval.max_gen_toks=8",
    "search.points=[{optim.lr: 3.0e-3, plora.momentum: 0.1}]",
]


def _records(sdir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((sdir / "trials").glob("*.json"))}


# With search.trial_executor: train (a Ray Train run per trial: a fork's run starts from the
# copied checkpoint through TorchTrainer's resume_from_checkpoint) in the full suite only.
@pytest.mark.slow
@pytest.mark.parametrize("executor", ["actor", pytest.param("train", marks=pytest.mark.full)])
def test_pbt_unload_search_forks_resumes_after_a_kill_and_replays(
    tmp_path: Path, executor: str
) -> None:
    storage = tmp_path / "st"
    cmd = [
        sys.executable,
        "-m",
        "plora_ray.cli",
        "search",
        str(SPACE),
        "--storage",
        str(storage),
        "--name",
        "pbt",
        "--set",
        *PBT_SETS,
        f"search.trial_executor={executor}",
    ]
    sdir = storage / "pbt"
    # actor: 2 CPUs for 3 trials, so Tune's PBT pauses and resumes them in turn; train: the whole
    # population at once (a driver CPU and a worker CPU per trial), which pbt_unload requires.
    with helpers.ray_head(num_cpus=2 if executor == "actor" else 6) as head:
        env = {**helpers.ray_defaults_env(), "RAY_ADDRESS": head["gcs"], "RAY_AUTH_MODE": "token"}
        log1 = tmp_path / "run1.log"
        with open(log1, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
            deadline = time.time() + 420
            while time.time() < deadline and proc.poll() is None:
                if (sdir / "forks").is_dir() and any((sdir / "forks").iterdir()):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, "the search ended unkilled:\n" + log1.read_text()[-3000:]
            assert any((sdir / "forks").iterdir()), "no fork in time:\n" + log1.read_text()[-3000:]
            time.sleep(3)  # past Tune's next snapshot (TUNE_GLOBAL_CHECKPOINT_S 2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        before = _records(sdir)
        out = subprocess.run(
            cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    after = _records(sdir)
    assert len(after) == 3 and {r["status"] for r in after.values()} == {"completed"}, after
    for tid, rec in before.items():
        assert after[tid] == rec  # finished before the kill: untouched
    # Every record carries its lineage; at least one trial forked from another at an unload and
    # its params hold the schedule: the parent's params plus an entry at the fork stage.
    forked = [r for r in after.values() if len(r["lineage"]) > 1]
    assert forked, [r["lineage"] for r in after.values()]
    for rec in after.values():
        assert rec["lineage"][0]["stage"] == 0 and rec["lineage"][0]["parent"] is None
    rec = forked[0]
    last = rec["lineage"][-1]
    assert last["parent"] in after and last["parent"] != rec["trial_id"]
    assert 1 <= last["stage"] <= 5 and last["step"] == 2 * last["stage"]
    stages = rec["params"]["plora.stages"]
    assert stages[-1]["at"] == last["stage"]
    assert {k: v for k, v in stages[-1].items() if k != "at"} == last["settings"]
    assert rec["config"]["plora"]["stages"] == stages
    run = Path(rec["run_dir"])
    assert json.loads((run / "fork.json").read_text())["stage"] == last["stage"]
    # Its curve continues the parent's up to the fork, then its own with the new LR.
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    numbered = [m["step"] for m in steps if "step" in m and not m.get("final")]
    assert numbered == sorted(numbered) and numbered[-1] == 12, numbered
    after_fork = [m for m in steps if m.get("step", 0) > last["step"] and "lr" in m]
    assert after_fork and all(
        abs(m["lr"] - last["settings"]["optim.lr"]) < 1e-12 for m in after_fork[:1]
    ), after_fork[:1]
    # The study holds one trial per population member, all told to Optuna.
    study = optuna.load_study(study_name="pbt", storage=f"sqlite:///{sdir / 'study.db'}")
    assert len(study.trials) == 3
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    # The board shows the lineage.
    board = json.loads((sdir / "leaderboard" / "leaderboard.json").read_text())
    assert any(row.get("lineage") for row in board["rows"]), board["rows"][0].keys()
    assert "Lineage" in (sdir / "leaderboard" / "index.html").read_text()

    # `plora-ray train` replays the forked trial's schedule from step 0 (the parent's stages,
    # then the fork's) and lands on the same proxy within noise.
    cfg_file = tmp_path / "replay.yaml"
    cfg_file.write_text(yaml.safe_dump(rec["config"]))
    out_dir = tmp_path / "replay"
    env = helpers.ray_defaults_env()
    r = subprocess.run(
        [sys.executable, "-m", "plora_ray.cli", "train", str(cfg_file), "--output", str(out_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    replayed = json.loads((out_dir / "result.json").read_text())["metrics"]["gsm8k_nll"]
    assert abs(replayed - rec["proxy"]) < 0.01, (replayed, rec["proxy"])
