"""Evaluation across the ranks of a torch.distributed group.

``shard_lm`` wraps an lm-eval LM so that each rank scores only its share of the documents
(``ShardedLM``); ``check_distributed`` and ``broadcast_from_rank0`` are the process-group checks
and the result hand-out that ``plora_ray.evaluate`` and ``plora_ray.proxy`` share.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

# Sets the hub's offline switches before lm-eval (and through it `datasets` and the hub client)
# is first imported: no machine of this project reaches a hub.
import plora_ray.tasks.offline  # noqa: F401

# isort: split
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

__all__ = ["ShardedLM", "broadcast_from_rank0", "check_distributed", "shard_lm"]


def _shard_of(requests: list[Instance], world_size: int) -> list[int]:
    """Rank of each request: documents (task, doc_id) dealt round-robin in first-seen order.

    Whole documents, not single requests, go to a rank, because HFLM scores the choices of a
    multiple-choice document that share a context in one forward pass.
    """
    owner: dict[tuple[str | None, int | None], int] = {}
    out = []
    for r in requests:
        key = (r.task_name, r.doc_id)
        if key not in owner:
            owner[key] = len(owner) % world_size
        out.append(owner[key])
    return out


class ShardedLM(LM):
    """Scores this rank's share of the documents with ``inner`` and gathers all answers.

    lm-eval builds every request on every rank (this LM reports rank 0 of 1), so the few-shot
    contexts are exactly those of a single-process run; each rank runs only the requests of its
    documents through the model, the responses are exchanged with
    ``torch.distributed.all_gather_object``, and every rank applies lm-eval's filters and metrics
    to the full set. lm-eval 0.4.13's own data parallelism is not used: HFLM drops it for a model
    passed as an instance (rank 0 of 1), it needs ``accelerate launch``, and it builds few-shot
    contexts per rank, so 5-shot GSM8K prompts would change with the number of ranks.

    Args:
        inner: the model (e.g. HFLM) that scores this rank's requests.
        shard_rank: this process's rank.
        num_shards: the number of ranks.
    """

    # Not `rank` / `world_size`: LM's own properties of those names must keep saying rank 0 of
    # 1, or lm-eval would return results on one rank only.
    def __init__(self, inner: LM, shard_rank: int, num_shards: int) -> None:
        super().__init__()
        self.inner = inner
        self.shard_rank = shard_rank
        self.num_shards = num_shards

    def _run(self, method: str, requests: list[Instance], **kw: Any) -> list[Any]:
        owners = _shard_of(requests, self.num_shards)
        mine = [i for i, o in enumerate(owners) if o == self.shard_rank]
        outs = getattr(self.inner, method)([requests[i] for i in mine], **kw) if mine else []
        gathered: list[Any] = [None] * self.num_shards
        dist.all_gather_object(gathered, list(zip(mine, outs, strict=True)))
        result: list[Any] = [None] * len(requests)
        seen = 0
        for part in gathered:
            for i, out in part:
                result[i] = out
                seen += 1
        if seen != len(requests):
            raise RuntimeError(
                f"sharded evaluation: gathered {seen} responses for "
                f"{len(requests)} requests (ranks built different requests)"
            )
        return result

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[Any]:
        return self._run("loglikelihood", requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[Any]:
        return self._run("loglikelihood_rolling", requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[Any]:
        return self._run("generate_until", requests, disable_tqdm=disable_tqdm)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.inner.apply_chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.inner.tokenizer_name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.inner.chat_template(chat_template)


def shard_lm(inner: LM, rank: int, world_size: int) -> LM:
    """Wrap an lm-eval LM so this rank scores only its share of documents (see ShardedLM).

    Call the wrapped LM's methods on every rank of the default process group with the same
    requests (lm-eval builds them deterministically); each rank returns all responses.

    Args:
        inner: the model (e.g. HFLM) that scores this rank's requests.
        rank: this process's rank.
        world_size: the number of ranks.
    """
    return ShardedLM(inner, rank, world_size)


def check_distributed(rank: int, world_size: int) -> None:
    """Check ``rank`` / ``world_size`` against the default process group (none needed for 1).

    Raises:
        ValueError: ``rank`` out of range, or values that differ from the process group's.
        RuntimeError: ``world_size > 1`` without an initialized process group.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank/world_size: expected 0 <= rank < world_size, found rank={rank}, "
            f"world_size={world_size}"
        )
    if world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"world_size={world_size} needs an initialized torch.distributed "
                "process group (Ray Train workers have one)"
            )
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(
                f"rank/world_size ({rank}/{world_size}) differ from the process "
                f"group's ({dist.get_rank()}/{dist.get_world_size()})"
            )


def broadcast_from_rank0(obj: Any, rank: int) -> Any:
    """Rank 0's ``obj`` on every rank (``broadcast_object_list``); other ranks pass anything."""
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
