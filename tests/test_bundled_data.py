"""The benchmark files in plora_ray/benchmark_data: hashes, counts, and that every row parses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from plora_ray.tasks import mmlu_subject_categories
from plora_ray.tasks.local_data import (
    BUNDLED_DATA_DIR,
    mmlu_subjects,
    read_arc,
    read_gsm8k,
    read_mmlu,
)

MANIFEST = BUNDLED_DATA_DIR / "MANIFEST.sha256"

# The sha256 published in SOURCES.md of the shared data folder (the provenance record); the
# manifest must agree with it, so a re-generated manifest cannot silently bless changed data.
PUBLISHED_SHA256 = {
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "gsm8k/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "arc/arc_challenge.jsonl": "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636",
    "arc/arc_easy.jsonl": "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5",
}


def _manifest() -> dict[str, str]:
    out = {}
    for line in MANIFEST.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.strip()] = digest
    return out


def test_manifest_lists_every_shipped_file_with_its_sha256() -> None:
    manifest = _manifest()
    shipped = {
        p.relative_to(BUNDLED_DATA_DIR).as_posix()
        for p in BUNDLED_DATA_DIR.rglob("*")
        if p.is_file()
        and p.name not in ("SOURCES.md", "MANIFEST.sha256")
        and "__pycache__" not in p.parts
    }
    assert set(manifest) == shipped
    for name, digest in manifest.items():
        actual = hashlib.sha256((BUNDLED_DATA_DIR / name).read_bytes()).hexdigest()
        assert actual == digest, f"{name}: sha256 {actual} differs from the manifest's {digest}"
    for name, digest in PUBLISHED_SHA256.items():
        assert manifest[name] == digest, f"{name}: manifest disagrees with SOURCES.md"
    # Every MMLU CSV and every license is pinned too.
    assert sum(n.startswith("mmlu/test/") for n in manifest) == 57
    assert sum(n.startswith("mmlu/dev/") for n in manifest) == 57
    assert {n for n in manifest if "LICENSE" in n} == {
        "gsm8k/LICENSE",
        "arc/LICENSE.llm-foundry-Apache-2.0",
        "mmlu/LICENSE.hendrycks-test-MIT",
        "mmlu/LICENSE.MLILAB-FedLLM-Apache-2.0",
    }


def test_gsm8k_counts_and_answers_end_with_the_final_number() -> None:
    train, test = read_gsm8k(BUNDLED_DATA_DIR, "train"), read_gsm8k(BUNDLED_DATA_DIR, "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert all("\n#### " in r["answer"] for r in train + test)


def test_mmlu_has_57_subjects_14042_test_rows_and_285_dev_rows() -> None:
    subjects = mmlu_subjects(BUNDLED_DATA_DIR)
    assert len(subjects) == 57
    # Exactly the subjects of the installed lm-eval's mmlu group.
    assert set(subjects) == set(mmlu_subject_categories())
    test = [r for s in subjects for r in read_mmlu(BUNDLED_DATA_DIR, "test", s)]
    dev = [r for s in subjects for r in read_mmlu(BUNDLED_DATA_DIR, "dev", s)]
    assert (len(test), len(dev)) == (14042, 285)
    assert all(len(read_mmlu(BUNDLED_DATA_DIR, "dev", s)) == 5 for s in subjects)
    assert all(len(r["choices"]) == 4 and r["answer"] in (0, 1, 2, 3) for r in test + dev)


@pytest.mark.parametrize(("name", "count"), [("arc_easy", 2376), ("arc_challenge", 1172)])
def test_arc_counts_and_hub_schema(name: str, count: int) -> None:
    rows = read_arc(BUNDLED_DATA_DIR, name)
    assert len(rows) == count
    for r in rows:
        assert r["choices"]["label"] == ["A", "B", "C", "D"]
        assert r["answerKey"] in r["choices"]["label"]
        assert not r["question"].startswith("Question:")


def test_licenses_are_shipped_beside_the_data() -> None:
    for name in (
        "gsm8k/LICENSE",
        "mmlu/LICENSE.hendrycks-test-MIT",
        "arc/LICENSE.llm-foundry-Apache-2.0",
    ):
        assert (Path(BUNDLED_DATA_DIR) / name).stat().st_size > 100
