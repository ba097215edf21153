"""Export of a trained model in the Hugging Face layout (safetensors, config, tokenizer).

The last step of a run (``training_run``): the adapter's update goes into the backbone (under
PLoRA already merged by ``PLoRA.merge_adapter`` with the unloads' rounding), the adapter layers
are dropped, and the result loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["export_model"]


@contextmanager
def _maybe_gathered(access: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    if access is None:
        yield
    else:
        with access.gathered(params):
            yield


# The exported model's shard size: LLaMA-7B (13.5 GB in bf16) is written as 3 safetensors
# shards and an index, as hub checkpoints are, instead of transformers 5's default of one
# file up to 50 GB, which a hub upload or a partial read handles badly.
EXPORT_SHARD_SIZE = "5GB"


def export_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike[str],
    *,
    access: Any = None,
    write: bool = True,
    merge_adapter: bool = True,
    max_shard_size: int | str = EXPORT_SHARD_SIZE,
) -> Path:
    """Save the merged model in the Hugging Face layout (safetensors, config, tokenizer).

    A peft model has its adapter merged into the backbone first (``merge_and_unload``, in place:
    call this last), or, under PLoRA, whose ``PLoRA.merge_adapter`` already merged it with the
    unloads' rounding, its adapter layers dropped (peft's ``unload``). The result loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    Args:
        model: the trained model (a ``PeftModel`` or a plain ``PreTrainedModel``).
        tokenizer: saved beside the weights.
        out_dir: target directory (replaced if it exists).
        access: a ParamAccess, to gather partitioned (ZeRO-3) parameters while merging and saving
            (then every rank calls this, and only one writes).
        write: whether this rank writes the files.
        merge_adapter: False: the adapter's update is in the backbone already; drop it.
        max_shard_size: the largest safetensors file; a bigger model is sharded with an index.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    with _maybe_gathered(access, list(model.parameters())):
        # A peft model merges (or drops) its adapter; a plain model is saved as it is.
        merge = getattr(model, "merge_and_unload" if merge_adapter else "unload", None)
        merged: Any = merge() if merge is not None else model
        if not write:
            return out
        if tmp.exists():
            shutil.rmtree(tmp)
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
