"""What the data pipeline did, per source and overall: reported with the run and printed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DataStats", "SourceStats"]


@dataclass
class SourceStats:
    """Counts for one ``data.sources[i]``."""

    name: str
    records: int = 0  # valid dialogues read
    invalid_skipped: int = 0
    used: int = 0  # samples of this source in one training epoch (after mixing and held-out)


@dataclass
class DataStats:
    """What the data pipeline did; reported with the run (``as_dict``) and printed (``summary``)."""

    sources: list[SourceStats] = field(default_factory=list)
    chat_template: str = "tokenizer"  # "tokenizer" or "default" (DEFAULT_CHAT_TEMPLATE)
    assistant_mask: str = "generation_tags"  # or "prefix_diff"
    invalid_skipped: int = 0
    # First few skipped-record messages, so a user can see why records were skipped.
    invalid_examples: list[str] = field(default_factory=list)
    train_examples: int = 0
    held_out_examples: int = 0
    truncated: int = 0  # examples cut to max_length (train + held-out)
    dropped_no_labels: int = 0  # examples with no assistant token left after truncation
    train_rows: int = 0  # rows after packing (= train_examples without packing)
    train_tokens: int = 0
    train_label_tokens: int = 0
    max_length: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        src = ", ".join(f"{s.name}: {s.used}" for s in self.sources)
        return (
            f"data: {self.train_examples} train examples ({src}) in {self.train_rows} rows, "
            f"{self.held_out_examples} held out, {self.truncated} truncated to "
            f"{self.max_length} tokens, {self.dropped_no_labels} dropped without assistant "
            f"tokens, {self.invalid_skipped} invalid records skipped; "
            f"{self.train_tokens} tokens ({self.train_label_tokens} labelled)"
        )
