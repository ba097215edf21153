"""Chat template and tokenization: assistant-only labels, truncation, packing.

``tokenize_dialogue`` renders the tokenizer's chat template and labels assistant tokens only
(-100 elsewhere), truncating to ``data.max_length`` (counted). ``pack_examples`` optionally packs
several examples into one row.

Assistant spans. A template with ``{% generation %}`` markers (the tiny tokenizer's) gives the
assistant mask directly (``return_assistant_tokens_mask``). For a template without them, the span
of assistant turn ``i`` is found by rendering the conversation prefix by prefix: tokens of
``messages[:i]`` with the generation prompt, then of ``messages[:i+1]``; the tokens in between are
the assistant's reply plus the template's end-of-turn marker, and any template text after the last
special token of that span (e.g. Qwen's newline after ``<|im_end|>``) is left unlabelled. This
needs a template whose rendering of a prefix is a token prefix of the full rendering; one that
rewrites earlier turns raises ``ValueError`` instead of labelling the wrong tokens. A tokenizer with
no template at all gets ``DEFAULT_CHAT_TEMPLATE`` (see ``ensure_chat_template``).

Packing. A packed row carries ``position_ids`` that restart at 0 for every example; how the model
then keeps examples apart is in ``plora_ray.data.batching``. Labels never cross examples: each
example's first token is a template token labelled -100, so the last token of one example is never
trained to predict the next example.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from plora_ray.data.sources import Dialogue
from plora_ray.data.stats import DataStats

if TYPE_CHECKING:
    from transformers import BatchEncoding, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "TokenizedSet",
    "assistant_mask_by_prefix",
    "ensure_chat_template",
    "has_generation_tags",
    "pack_examples",
    "tokenize_dialogue",
    "tokenize_dialogues",
]

IGNORE_INDEX = -100

# For tokenizers that ship no chat template (base models such as LLaMA-7B): plain-text headers,
# assistant turns end with the EOS token so generation stops there; the {% generation %} markers
# give the assistant mask.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ '### User:\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class TokenizedSet:
    """Token rows ready for batching.

    ``num_examples[i]`` is how many dialogues row ``i`` holds (1 unless packed);
    ``position_ids`` is set only for packed rows (restarting at 0 for each example).
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    num_examples: list[int]
    pad_token_id: int
    position_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def total_examples(self) -> int:
        return int(sum(self.num_examples))


def _template_text(tokenizer: PreTrainedTokenizerBase) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), None)
    return t


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give a tokenizer without a chat template ``DEFAULT_CHAT_TEMPLATE``; return which one it uses.

    The tokenizer object is changed in place, so a tokenizer saved with the model carries the
    template it was trained with (evaluation in chat format then matches training).
    """
    if _template_text(tokenizer):
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def has_generation_tags(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template marks assistant text with ``{% generation %}``."""
    return bool(_GENERATION_TAG.search(_template_text(tokenizer) or ""))


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
) -> list[int]:
    # return_dict=True returns a BatchEncoding; transformers annotates the union of every mode.
    out = cast(
        "BatchEncoding",
        tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        ),
    )
    return list(out["input_ids"])


def assistant_mask_by_prefix(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) with mask 1 on assistant tokens, found by rendering prefix by prefix.

    Raises:
        ValueError: the template's rendering of a prefix is not a token prefix of the full
            rendering (a template that rewrites earlier turns).
    """
    ids = _render(tokenizer, messages)
    mask = [0] * len(ids)
    special = set(tokenizer.all_special_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = _render(tokenizer, messages[: i + 1])
        if ids[: len(before)] != before or ids[: len(upto)] != upto:
            raise ValueError(
                "chat template: expected the rendering of a conversation prefix "
                "to be a token prefix of the whole conversation (needed to find "
                "assistant tokens without {% generation %} markers), found it is "
                "not; add {% generation %} markers to the template"
            )
        end = len(upto)
        last_special = max((k for k in range(len(before), end) if ids[k] in special), default=None)
        if last_special is not None:
            end = last_special + 1  # drop template text after the end-of-turn token
        for k in range(len(before), end):
            mask[k] = 1
    return ids, mask


def tokenize_dialogue(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_length: int,
    *,
    use_generation_tags: bool | None = None,
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are the token ids on assistant tokens, -100 elsewhere.

    Args:
        tokenizer: a tokenizer with a chat template (see ``ensure_chat_template``).
        messages: [{"role", "content"}].
        max_length: rows longer than this keep their first ``max_length`` tokens.
        use_generation_tags: how to find assistant tokens (None: detect from the template).

    Raises:
        ValueError: see ``assistant_mask_by_prefix``.
    """
    if use_generation_tags is None:
        use_generation_tags = has_generation_tags(tokenizer)
    if use_generation_tags:
        out = cast(
            "BatchEncoding",
            tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            ),
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = assistant_mask_by_prefix(tokenizer, messages)
    labels = [t if k else IGNORE_INDEX for t, k in zip(ids, mask)]
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def pack_examples(
    examples: list[tuple[list[int], list[int]]], max_length: int, pad_token_id: int
) -> TokenizedSet:
    """Greedily pack examples, in the given order, into rows of at most ``max_length`` tokens.

    Each example keeps its own labels; ``position_ids`` restart at 0 per example (the attention
    that follows from them is described in ``plora_ray.data.batching``).
    """
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    rows_pos: list[list[int]] = []
    counts: list[int] = []
    for ids, labels in examples:
        if not rows_ids or len(rows_ids[-1]) + len(ids) > max_length:
            rows_ids.append([])
            rows_labels.append([])
            rows_pos.append([])
            counts.append(0)
        rows_ids[-1].extend(ids)
        rows_labels[-1].extend(labels)
        rows_pos[-1].extend(range(len(ids)))
        counts[-1] += 1
    return TokenizedSet(rows_ids, rows_labels, counts, pad_token_id, rows_pos)


def tokenize_dialogues(
    dialogues: list[Dialogue],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    stats: DataStats | None = None,
    kept: list[int] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Tokenize dialogues; truncation and examples left without labels are counted in ``stats``.

    Examples whose assistant tokens were all truncated away are dropped: they carry no loss.
    The indices of the dialogues kept are appended to ``kept`` when given.
    """
    use_tags = has_generation_tags(tokenizer)
    if stats is not None:
        stats.assistant_mask = "generation_tags" if use_tags else "prefix_diff"
    out = []
    for i, d in enumerate(dialogues):
        ids, labels, truncated = tokenize_dialogue(
            tokenizer, d.messages, max_length, use_generation_tags=use_tags
        )
        if stats is not None:
            stats.truncated += int(truncated)
        if all(label == IGNORE_INDEX for label in labels):
            if stats is not None:
                stats.dropped_no_labels += 1
            continue
        out.append((ids, labels))
        if kept is not None:
            kept.append(i)
    return out
