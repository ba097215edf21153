"""benchmarks/unload_scale.py at small widths: the trainer's unload path end to end, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import unload_scale


def test_quick_tiny_json_has_the_headline_and_breakdown(tmp_path: Path) -> None:
    out = tmp_path / "u.json"
    result = unload_scale.main(["--quick", "--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["headline"].keys() >= {
        "unload_over_plain_merge",
        "unload_over_plain_merge_from_base_20",
        "rank_tracking_ms",
        "host_bytes_per_unload",
    }
    assert result["headline"]["unload_over_plain_merge"] > 0
    assert len(saved["unload_s"]["from_base"]) == 20
    pieces = {row["piece"] for row in saved["breakdown_per_layer"]}
    assert {"bookkeeping", "checkpoint at unload", "W_0 read (from_base)"} <= pieces
    assert saved["projection"]["paper_interval_200_steps"]["interval_steps"] == 200
    # the recorder keeps every target's fp32 factors: r·(out + in) numbers per target
    assert saved["headline"]["host_bytes_per_unload"] > 0
