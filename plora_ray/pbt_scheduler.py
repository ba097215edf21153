"""``pbt_unload`` on Ray Tune's PBT machinery: ``UnloadPBT`` is Tune's ``PopulationBasedTraining``
with PLoRA's unloads as its perturbation points and a compact fork (``plora_ray.pbt``).

What is Tune's: the population's quantiles at each perturbation point, pausing the forking
trial, giving it a new config and running it again (``choose_trial_to_run`` shares the slots when
the population is larger than ``max_concurrent``), and the scheduler's state in the experiment
snapshot that ``--resume`` restores. What is changed, and why:

- The time axis is ``stage`` (the number of unloads so far) with a perturbation interval of 1,
  and only a report made at an unload (``proxy_point``) is a perturbation point: the stage's
  proxy is computed there and its checkpoint written. The unload at a run's last step is not
  one (no stage is left to fork into).
- Tune's PBT hands the forking trial the parent's Tune checkpoint. A trial here trains in a Ray
  Train run (or the trial actor) whose checkpoints are the run's own (``<run>/ray/step_N``), so
  the parent's unload checkpoint is copied at once into ``<search>/forks/`` (the parent trains
  on and keeps only its newest ``checkpoint.keep``) and named in the child's config
  (``pbt.PBT_KEY``); the trial driver starts the child's run from that copy.
- The new config is ``pbt.fork_config``: the parent's params plus a ``plora.stages`` entry at
  the fork stage with the perturbed per-stage settings, and the lineage.
- Tune refuses a search algorithm beside PBT (its configs would change under the searcher). Here
  the Optuna searcher samples the population only, and the study records each member under the
  params it started with (the record's lineage has the rest), so ``on_trial_add`` allows it.
- The parent is drawn from the top quantile with a seeded generator (``search.seed``).

Written against ray 2.60.0: ``_PBTTrialState``, ``_trial_state``, ``_checkpoint_or_exploit`` and
``_exploit`` are private to ``ray.tune.schedulers.pbt``.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from typing import Any, cast

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pbt import _PBTTrialState

from plora_ray.pbt import fork_config
from plora_ray.search_params import ParamSpec
from plora_ray.search_scheduler import SchedulerSpec
from plora_ray.store import METRICS_FILE, SearchDir

__all__ = ["FORKS_DIR", "UnloadPBT", "copy_fork"]

FORKS_DIR = "forks"


class UnloadPBT(PopulationBasedTraining):
    """Ray Tune PBT whose perturbation points are PLoRA unloads (see the module docstring).

    Args:
        spec: the ``pbt_unload`` scheduler block.
        params: the search's params (the distributions a fork perturbs within).
        storage: the search's storage (``search.storage``).
        name: the search's name.
        seed: seeds the choice of parents and the perturbations (``search.seed``).
    """

    def __init__(
        self, spec: SchedulerSpec, params: list[ParamSpec], storage: str, name: str, seed: int
    ) -> None:
        super().__init__(
            time_attr="stage",
            metric=spec.metric,
            mode="max" if spec.direction == "maximize" else "min",
            perturbation_interval=1,
            burn_in_period=spec.burn_in_stages,
            quantile_fraction=spec.quantile_fraction,
            resample_probability=spec.resample_probability,
            perturbation_factors=spec.perturbation_factors,
            # Unused (fork_config explores), but Tune's PBT requires one of the two.
            custom_explore_fn=_unused_explore,
            log_config=False,
            require_attrs=False,
        )
        self.spec, self.params = spec, params
        self.storage, self.name = storage, name
        self.rng = random.Random(seed)
        self.forks = 0
        self.fork_points: dict[str, str] = {}  # top trial id -> its unload checkpoint

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if not self._metric or not self._metric_op:
            raise ValueError(f"UnloadPBT needs a metric and a mode, found {self._metric!r}")
        self._trial_state[trial] = _PBTTrialState(trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if not result.get("proxy_point") or not result.get("checkpoint"):
            return TrialScheduler.CONTINUE
        if int(result.get("step") or 0) >= int(result.get("total_steps") or 0):
            return TrialScheduler.CONTINUE  # the run's last unload: no stage left to fork into
        if not isinstance(result.get(self.spec.metric), (int, float)):
            return TrialScheduler.CONTINUE
        return str(super().on_trial_result(tune_controller, trial, result))

    def _checkpoint_of(self, trial: Trial, result: dict[str, Any]) -> str:
        """The unload checkpoint a report was made with: Ray Train's persisted path (which
        ``TuneReportCallback`` adds), else the run directory's ``ray/step_N``."""
        path = result.get("checkpoint_path")
        if isinstance(path, str) and path:
            return path
        run_dir = SearchDir(self.storage, self.name).run_dir(trial.trial_id)
        return os.path.join(run_dir, "ray", f"step_{int(result['step']):06d}")

    def _checkpoint_or_exploit(
        self,
        trial: Trial,
        tune_controller: Any,
        upper_quantile: list[Trial],
        lower_quantile: list[Trial],
    ) -> None:
        # A top trial's fork point: the unload checkpoint of its last perturbation report (kept
        # here, not in Tune's state.last_checkpoint, which holds Tune checkpoints).
        if trial in upper_quantile:
            self.fork_points[trial.trial_id] = self._checkpoint_of(trial, _result(trial, self))
            self._num_checkpoints += 1
        else:
            self.fork_points.pop(trial.trial_id, None)
        if trial not in lower_quantile:
            return
        parents = [t for t in upper_quantile if t.trial_id in self.fork_points]
        if parents:
            self._exploit(tune_controller, trial, self.rng.choice(parents))

    def _exploit(self, tune_controller: Any, trial: Trial, trial_to_clone: Trial) -> None:
        state, parent = self._trial_state[trial], self._trial_state[trial_to_clone]
        src = self.fork_points[trial_to_clone.trial_id]
        res, own = _result(trial_to_clone, self), _result(trial, self)
        metric = self.spec.metric
        stage = int(res["stage"])
        sdir = SearchDir(self.storage, self.name)
        # Unique even across a --resume (which restores this scheduler from an older snapshot).
        name = f"{trial.trial_id}-stage{stage:03d}-{uuid.uuid4().hex[:8]}"
        dest = os.path.join(sdir.path, FORKS_DIR, name)
        try:
            copy_fork(src, dest, sdir.run_dir(trial_to_clone.trial_id))
        except OSError as exc:
            # Gone already: the parent kept only its newest checkpoints, or its run ended.
            print(f"pbt_unload: trial {trial.trial_id} does not fork this time ({exc})")
            shutil.rmtree(dest, ignore_errors=True)
            return
        self.forks += 1
        new_config = fork_config(
            trial_to_clone.config,
            parent_id=trial_to_clone.trial_id,
            child_id=trial.trial_id,
            stage=stage,
            step=int(res["step"]),
            samples=int(res.get("samples") or 0),
            parent_proxy=_number(res.get(metric)),
            own_proxy=_number(own.get(metric)),
            checkpoint=os.path.join(dest, os.path.basename(src.rstrip("/"))),
            spec=self.spec,
            params=self.params,
            rng=self.rng,
        )
        tune_controller.pause_trial(trial, should_checkpoint=False)
        trial.set_experiment_tag(f"{state.orig_tag}@fork{self.forks}")
        trial.set_config(new_config)
        self._num_perturbations += 1
        state.last_perturbation_time = parent.last_perturbation_time
        state.last_train_time = parent.last_train_time


def _result(trial: Trial, pbt: UnloadPBT) -> dict[str, Any]:
    """The report a trial made at its last perturbation point."""
    return cast(dict[str, Any], pbt._trial_state[trial].last_result or {})


def copy_fork(checkpoint: str, dest: str, parent_run: str) -> None:
    """Copy a parent's unload checkpoint to ``dest/<its name>`` and its reports up to then to
    ``dest/metrics.jsonl`` (the child's curve continues the parent's).

    Raises:
        OSError: the checkpoint is not there (any more) or cannot be copied.
    """
    name = os.path.basename(checkpoint.rstrip("/"))
    os.makedirs(dest, exist_ok=True)
    shutil.copytree(checkpoint, os.path.join(dest, name))
    metrics = os.path.join(parent_run, METRICS_FILE)
    if os.path.isfile(metrics):
        shutil.copyfile(metrics, os.path.join(dest, METRICS_FILE))


def _unused_explore(config: dict[str, Any]) -> dict[str, Any]:
    return config


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
