"""The proxy objective: mean per-token NLL of reference answers, cheap enough for every rung.

``gsm8k_nll`` scores the reference GSM8K solutions given the question and ``mmlu_nll`` the MMLU
gold answer letters, with the prompts of the stock lm-eval task configs; no generation, so it
costs a few forward passes and can rank trials at early-stopping rungs where a full evaluation
would cost too much.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

# Sets the hub's offline switches before lm-eval (and through it `datasets` and the hub client)
# is first imported: no machine of this project reaches a hub.
import plora_ray.tasks.offline  # noqa: F401

# isort: split
from lm_eval.utils import apply_template

from plora_ray.config import EvalConfig
from plora_ray.eval_sharding import check_distributed
from plora_ray.eval_state import eval_mode, preserved_rng
from plora_ray.tasks import fixed_subsample, stock_config
from plora_ray.tasks.local_data import data_root, mmlu_subjects, read_gsm8k, read_mmlu

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["proxy_nll"]


def _proxy_pairs(
    ev: EvalConfig, tokenizer: PreTrainedTokenizerBase
) -> dict[str, list[tuple[str, str]]]:
    """(context, continuation) text pairs per proxy, prompts rendered from the stock configs."""
    root = data_root(ev.data_dir)
    docs: dict[str, list[tuple[str, str, str]]] = {}  # key -> (context, delimiter, answer)
    if "gsm8k" in ev.tasks:
        cfg = stock_config("gsm8k/gsm8k.yaml")
        rows = read_gsm8k(root, "test")
        idx = fixed_subsample("gsm8k_nll", len(rows), ev.proxy_samples, ev.limit_seed)
        picked = rows if idx is None else [rows[i] for i in idx]
        docs["gsm8k_nll"] = [
            (apply_template(cfg["doc_to_text"], d), " ", apply_template(cfg["doc_to_target"], d))
            for d in picked
        ]
    if "mmlu" in ev.tasks:
        cfg = stock_config("mmlu/default/_default_template_yaml")
        letters = cfg["doc_to_choice"]
        pool: list[tuple[str, dict[str, Any]]] = []
        for subject in mmlu_subjects(root):
            pool.extend((subject, d) for d in read_mmlu(root, "test", subject))
        idx = fixed_subsample("mmlu_nll", len(pool), ev.proxy_samples, ev.limit_seed)
        picked_m = pool if idx is None else [pool[i] for i in idx]
        out = []
        for subject, d in picked_m:
            description = stock_config(f"mmlu/default/mmlu_{subject}.yaml").get("description", "")
            out.append(
                (description + apply_template(cfg["doc_to_text"], d), " ", letters[d["answer"]])
            )
        docs["mmlu_nll"] = out
    pairs: dict[str, list[tuple[str, str]]] = {}
    for key, items in docs.items():
        if ev.chat_format:
            # The training chat format: the prompt as the user turn, the answer as the
            # assistant turn, scored on everything the template puts after the generation prompt.
            pairs[key] = []
            for ctx, _, answer in items:
                user = [{"role": "user", "content": ctx}]
                # tokenize=False returns the text; transformers annotates the union of every mode.
                prefix = cast(
                    str,
                    tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False),
                )
                full = cast(
                    str,
                    tokenizer.apply_chat_template(
                        user + [{"role": "assistant", "content": answer}], tokenize=False
                    ),
                )
                if not full.startswith(prefix):
                    raise ValueError(
                        "eval.chat_format: the tokenizer's chat template does not "
                        "extend the generation prompt with the assistant turn"
                    )
                pairs[key].append((prefix, full[len(prefix) :]))
        else:
            pairs[key] = [(ctx, delim + answer) for ctx, delim, answer in items]
    return pairs


def _sum_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    batch_size: int,
    chat: bool,
) -> tuple[float, int]:
    """Summed NLL of the continuation tokens and their count, batched with left padding."""
    device = next(model.parameters()).device
    max_len = int(getattr(getattr(model, "config", None), "max_position_embeddings", 4096))
    encoded = []
    for ctx, cont in pairs:
        # As HFLM does: the context with the tokenizer's special tokens (unless the chat
        # template already wrote them), the continuation without.
        c_ids = tokenizer(ctx, add_special_tokens=not chat)["input_ids"]
        a_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = (c_ids + a_ids)[-max_len:]
        encoded.append((ids, min(len(a_ids), len(ids) - 1)))
    encoded.sort(key=lambda x: len(x[0]))
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b : b + batch_size]
            width = max(len(ids) for ids, _ in batch)
            keep = max(n for _, n in batch) + 1
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (ids, _) in enumerate(batch):
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                mask[i, width - len(ids) :] = 1
            # Left padding puts every continuation at the end, so only the last `keep` positions
            # need logits (a vocabulary-sized row per position is most of the memory).
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=keep,
            )
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            for i, (ids, n) in enumerate(batch):
                if n <= 0:
                    continue
                # logits at position t predict token t+1; the last n tokens are the continuation.
                targets = torch.tensor(ids[-n:], device=logp.device)
                rows = logp[i, keep - 1 - n : keep - 1]
                total -= float(rows.gather(-1, targets[:, None]).sum())
                count += n
    return total, count


def proxy_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ev: EvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Mean per-token NLL of reference answers: ``gsm8k_nll`` and ``mmlu_nll``; no generation.

    ``gsm8k_nll``: the reference solutions of a fixed-seed subsample of ``ev.proxy_samples``
    GSM8K test problems, given the 0-shot stock prompt (``Question: ...\\nAnswer:``).
    ``mmlu_nll``: the gold answer letter of ``ev.proxy_samples`` MMLU test questions (over all
    subjects), given the 0-shot stock prompt. Each is computed for the task present in
    ``ev.tasks``; token-weighted over the subsample. With ``ev.chat_format`` the prompt is the
    user turn of the tokenizer's chat template and the answer the assistant turn.
    With ``world_size > 1`` (call on every rank) each rank scores every world_size-th document and
    the sums are gathered with ``all_gather_object``; every rank returns the same numbers.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        ev: eval settings (tasks, proxy_samples, limit_seed, chat_format, batch_size, data_dir).
        rank: this process's rank.
        world_size: number of ranks.

    Returns:
        ``{"gsm8k_nll": float, "mmlu_nll": float}`` for the tasks present; ``{}`` when
        ``ev.proxy_samples`` is 0.

    Raises:
        DataError: a missing data file or column.
        ValueError: a chat template that cannot separate prompt and answer.
    """
    check_distributed(rank, world_size)
    if ev.proxy_samples == 0:
        return {}
    pairs = _proxy_pairs(ev, tokenizer)
    sums: dict[str, tuple[float, int]] = {}
    with preserved_rng(), eval_mode(model):
        for key, items in pairs.items():
            sums[key] = _sum_nll(
                model, tokenizer, items[rank::world_size], ev.batch_size, ev.chat_format
            )
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, sums)
        sums = {k: (sum(g[k][0] for g in gathered), sum(g[k][1] for g in gathered)) for k in sums}
    return {k: total / count for k, (total, count) in sums.items() if count > 0}
