"""Which failures of a Ray Train run a search retries: lost infrastructure, not the run's own
errors (the trial driver retries those from the newest checkpoint, up to ``search.max_retries``).
"""

from __future__ import annotations

import os

# Ray 2.50-2.5x need this to select Train v2; from Ray 2.60 it is the default. Set before any
# ray.train import.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from ray.exceptions import RayActorError

# Private (Ray 2.60): what a lost worker or a worker group that cannot start raises inside
# Train's errors; the public WorkerGroupError wraps them.
from ray.train.v2._internal.exceptions import (
    WorkerGroupStartupFailedError,
    WorkerGroupStartupTimeoutError,
    WorkerHealthCheckFailedError,
    WorkerHealthCheckTimeoutError,
)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

__all__ = ["infrastructure_loss"]


def infrastructure_loss(exc: BaseException) -> str | None:
    """What a failed ``TorchTrainer.fit`` lost, when it lost infrastructure (else None).

    Train's failure handling retries any worker error, a bug in the training loop included; a
    search retries only what a new attempt can fix: a worker whose process or node died (its
    health check failed or hung: a ``RayActorError`` under it) or a worker group that could not
    start. An exception raised by the training loop itself is the run's failure.

    Returns:
        One line naming the error, the lost ranks and what was lost, or None.
    """
    if isinstance(exc, WorkerGroupError):
        dead = (WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError, RayActorError)
        lost = {r: e for r, e in sorted(exc.worker_failures.items()) if isinstance(e, dead)}
        if not lost:
            return None
        what = "; ".join(
            f"rank {rank}: "
            + (
                "the worker health check hung"
                if isinstance(e, WorkerHealthCheckTimeoutError)
                else "a worker health check failed, "
                + type(getattr(e, "health_check_failure", e)).__name__
            )
            for rank, e in lost.items()
        )
        return f"{type(exc).__name__}: lost Train worker(s) ({what})"
    if isinstance(exc, ControllerError):
        failure = exc.controller_failure
        if isinstance(failure, (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError)):
            return (
                f"{type(exc).__name__}: the worker group did not start ({type(failure).__name__})"
            )
    return None
