"""Run-config schema: paper defaults, every error category, all errors at once, overrides, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from plora_ray import cli
from plora_ray.config import (
    LLAMA_LINEAR_TARGETS,
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)


def write_yaml(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems_of(tmp_path: Path, data: dict | str, overrides: dict | None = None) -> list[str]:
    f = write_yaml(tmp_path / "run.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_config(f, overrides)
    prefix = f"{f}: "
    assert all(p.startswith(prefix) for p in err.value.problems), err.value.problems
    return [p[len(prefix) :] for p in err.value.problems]


def test_defaults_reproduce_the_paper():
    cfg = config_from_dict({})
    assert cfg.method == "plora"
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-4 and cfg.optim.schedule == "constant"
    assert cfg.optim.betas[1] == 0.99
    assert cfg.batch.global_batch == 24
    assert cfg.lora.rank == 8
    assert cfg.lora.targets == list(LLAMA_LINEAR_TARGETS) and len(cfg.lora.targets) == 7
    assert (cfg.plora.unload_every, cfg.plora.unload_unit) == (4800, "samples")
    # The embedded default model is the tiny LLaMA, and the data is bundled GSM8K.
    assert cfg.model.tiny is not None and cfg.model.path is None
    assert [s.path for s in cfg.data.sources] == ["bundled:gsm8k"]
    assert cfg.model.trust_remote_code is False


def test_dumped_config_loads_back_equal(tmp_path):
    cfg = config_from_dict({"lora": {"rank": 4}, "plora": {"momentum": 0.3}})
    f = write_yaml(tmp_path / "dumped.yaml", dump_config(cfg))
    assert load_config(f) == cfg


def test_unknown_key_names_file_and_suggests_the_close_key(tmp_path):
    probs = problems_of(tmp_path, {"lora": {"rnak": 8}, "plroa": {}})
    assert (
        "lora.rnak: unknown key (did you mean 'lora.rank'?); expected one of rank, alpha, "
        "dropout, targets"
    ) in probs
    assert any(p.startswith("plroa: unknown key (did you mean 'plora'?)") for p in probs)


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("lora", "rank", "eight", "lora.rank: expected an integer, found 'eight'"),
        ("lora", "rank", 8.5, "lora.rank: expected an integer, found 8.5"),
        ("optim", "lr", "fast", "optim.lr: expected a number, found 'fast'"),
        ("deepspeed", "bf16", "yes", "deepspeed.bf16: expected true or false, found 'yes'"),
        ("lora", "targets", "q_proj", "lora.targets: expected a list of a string, found 'q_proj'"),
        (
            "plora",
            "unload_unit",
            "sample",
            "plora.unload_unit: expected one of 'samples', 'steps', found 'sample' "
            "(did you mean 'samples'?)",
        ),
    ],
)
def test_wrong_type_names_key_expected_and_found(tmp_path, section, key, value, expected):
    assert expected in problems_of(tmp_path, {section: {key: value}})


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("plora", "momentum", 1.0, "plora.momentum: expected a number in [0, 1), found 1.0"),
        ("lora", "rank", 0, "lora.rank: expected an integer >= 1, found 0"),
        ("optim", "lr", -1e-4, "optim.lr: expected a number > 0, found -0.0001"),
        (
            "optim",
            "betas",
            [0.9, 1.5],
            "optim.betas: expected two numbers in [0, 1), found [0.9, 1.5]",
        ),
        ("deepspeed", "zero_stage", 4, "deepspeed.zero_stage: expected one of 0, 1, 2, 3, found 4"),
        ("data", "max_length", 4, "data.max_length: expected an integer >= 8, found 4"),
    ],
)
def test_out_of_range_value_names_key_expected_and_found(tmp_path, section, key, value, expected):
    assert expected in problems_of(tmp_path, {section: {key: value}})


def test_missing_paths_are_reported(tmp_path):
    probs = problems_of(
        tmp_path,
        {
            "model": {"path": "./no_such_model"},
            "data": {
                "sources": [
                    {"path": "missing.jsonl"},
                    {"dataset": "./no_such_dir"},
                    {"path": "bundled:gsm9k"},
                ]
            },
        },
    )
    joined = "\n".join(probs)
    assert (
        "model.path: expected an existing directory or a hub id, found './no_such_model' "
        "(no such directory)"
    ) in joined
    assert (
        f"data.sources[0].path: expected an existing JSONL file, found "
        f"'{tmp_path / 'missing.jsonl'}' (no such file)"
    ) in joined
    assert (
        "data.sources[1].dataset: expected a `datasets` hub name or an existing local directory"
    ) in joined
    assert (
        "data.sources[2].path: expected a JSONL file or one of bundled:gsm8k, found "
        "'bundled:gsm9k' (did you mean 'bundled:gsm8k'?)"
    ) in joined


def test_inconsistent_batch_sizes_are_reported(tmp_path):
    probs = problems_of(
        tmp_path, {"batch": {"global_batch": 24, "micro_batch": 5}, "resources": {"num_workers": 2}}
    )
    assert probs == [
        "batch.global_batch: expected a multiple of batch.micro_batch x "
        "resources.num_workers = 5 x 2 = 10, found 24"
    ]


def test_model_path_and_tiny_together_are_rejected(tmp_path):
    (tmp_path / "m").mkdir()
    probs = problems_of(tmp_path, {"model": {"path": str(tmp_path / "m"), "tiny": {}}})
    assert probs[0].startswith("model: expected exactly one of model.path")


def test_all_errors_of_a_file_are_reported_at_once(tmp_path):
    probs = problems_of(
        tmp_path,
        {
            "method": "plorra",
            "lora": {"rank": -1, "dropuot": 0.1},
            "optim": {"lr": "x"},
            "plora": {"momentum": 2},
            "batch": {"global_batch": 10, "micro_batch": 4},
            "eval": {"tasks": ["gsm8k", "mmmlu"]},
        },
    )
    keys = sorted(p.split(":", 1)[0] for p in probs)
    assert keys == [
        "batch.global_batch",
        "eval.tasks[1]",
        "lora.dropuot",
        "lora.rank",
        "method",
        "optim.lr",
        "plora.momentum",
    ]
    assert (
        "method: expected one of 'plora', 'lora', 'full', found 'plorra' (did you mean 'plora'?)"
    ) in probs


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="expected an existing YAML file"):
        load_config(tmp_path / "nope.yaml")
    bad = write_yaml(tmp_path / "bad.yaml", "lora: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    lst = write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(
        ConfigError, match=r"list\.yaml: <top level>: expected a mapping, found list"
    ):
        load_config(lst)


def test_relative_data_paths_are_resolved_against_the_yaml_directory(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    f = write_yaml(
        sub / "run.yaml",
        {"data": {"sources": [{"path": "train.jsonl"}, {"path": "bundled:gsm8k"}]}},
    )
    monkeypatch.chdir(tmp_path)  # a different working directory must not matter
    cfg = load_config(f)
    assert cfg.data.sources[0].path == str(sub / "train.jsonl")
    assert cfg.data.sources[1].path == "bundled:gsm8k"


# --------------------------------------------------------------------------- overrides


def test_overrides_set_dotted_keys_and_list_items(tmp_path):
    f = write_yaml(tmp_path / "run.yaml", {"data": {"sources": [{"path": "bundled:gsm8k"}]}})
    over = dict(
        parse_override(s)
        for s in [
            "lora.rank=16",
            "plora.momentum=0.2",
            "optim.betas=[0.9, 0.95]",
            "train.max_steps=null",
            "data.sources[0].weight=2",
        ]
    )
    cfg = load_config(f, over)
    assert cfg.lora.rank == 16 and cfg.plora.momentum == 0.2
    assert cfg.optim.betas == [0.9, 0.95] and cfg.train.max_steps is None
    assert cfg.data.sources[0].weight == 2.0


def test_bad_overrides_are_validated_and_blamed_on_the_override(tmp_path):
    probs = problems_of(tmp_path, {}, {"lora.rank": 0, "lora.rnak": 4})
    assert "lora.rank: expected an integer >= 1, found 0 (set by override lora.rank=0)" in probs
    assert any(p.startswith("lora.rnak: unknown key (did you mean 'lora.rank'?)") for p in probs)
    one_source = {"data": {"sources": [{"path": "bundled:gsm8k"}]}}
    probs = problems_of(tmp_path, one_source, {"data.sources[3].weight": 2})
    assert probs == [
        "override data.sources[3].weight: expected data.sources.3 to index an "
        "existing list item, found a list of 1 item(s)"
    ]


def test_parse_override_requires_key_and_equals():
    assert parse_override("plora.unload_every=9600") == ("plora.unload_every", 9600)
    assert parse_override("eval.tasks=[gsm8k]") == ("eval.tasks", ["gsm8k"])
    with pytest.raises(ConfigError, match="expected dotted.key=value, found no '='"):
        parse_override("lora.rank")


# --------------------------------------------------------------------------- CLI


def test_validate_cli_prints_every_problem_and_exits_nonzero(tmp_path, capsys):
    bad = write_yaml(tmp_path / "bad.yaml", {"lora": {"rank": 0}, "optim": {"lrr": 1}})
    good = write_yaml(tmp_path / "good.yaml", {"lora": {"rank": 4}})
    assert cli.main(["validate", str(good)]) == 0
    assert f"{good}: ok" in capsys.readouterr().out
    assert cli.main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: 2 problem(s)" in err
    assert f"{bad}: lora.rank: expected an integer >= 1, found 0" in err
    assert f"{bad}: optim.lrr: unknown key (did you mean 'optim.lr'?)" in err
    # --set overrides are validated too.
    assert cli.main(["validate", str(good), "--set", "plora.momentum=1.5"]) == 1
    assert "(set by override plora.momentum=1.5)" in capsys.readouterr().err


def test_validate_cli_runs_as_a_process(tmp_path):
    import subprocess
    import sys

    bad = write_yaml(tmp_path / "bad.yaml", {"batch": {"micro_batch": 5}})
    out = subprocess.run(
        [sys.executable, "-m", "plora_ray.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "batch.global_batch: expected a multiple of" in out.stderr


def test_run_config_is_a_plain_dataclass_tree():
    # Others build configs in code; the field names are the schema's public names.
    cfg = RunConfig()
    assert set(cfg.to_dict()) >= {
        "seed",
        "method",
        "model",
        "data",
        "lora",
        "plora",
        "optim",
        "batch",
        "train",
        "deepspeed",
        "resources",
        "eval",
        "checkpoint",
        "search",
    }
    assert cfg.grad_accum == 24 // (4 * 1)


# --------------------------------------------------------------------------- YAML input


def test_a_key_given_twice_is_refused_with_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lora:\n  rank: 4\nplora:\n  momentum: 0.2\nlora:\n  alpha: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert err.value.problems == [
        f"{f}:5: key 'lora' given twice in one mapping (first at line 1); expected each key "
        "once: merge the two, or YAML keeps only the last one's values"
    ]
    # Inside a section too; keys merged in with << may still be overridden.
    f.write_text("lora:\n  rank: 4\n  rank: 8\n")
    with pytest.raises(ConfigError, match=rf"{f}:3: key 'rank' given twice"):
        load_config(f)
    f.write_text("base: &b {rank: 4, alpha: 8}\n")
    assert yaml.safe_load(f.read_text())  # the anchor file itself is fine
    f.write_text("lora:\n  <<: {rank: 4, alpha: 8}\n  rank: 2\n")
    assert load_config(f).lora.rank == 2


def test_a_yaml_file_that_is_not_utf8_is_a_message_with_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_bytes(b"seed: 1\nmethod: \xff\xfe\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert err.value.problems == [f"{f}:2: expected UTF-8 text, found the byte 0xff"]


def test_a_yaml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("seed: 1\nlora: {rank: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    (problem,) = err.value.problems
    assert problem.startswith(f"{f}: not valid YAML at line 3: expected ',' or '}}'")
    assert "<unicode" not in problem


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("optim.lr", ".inf"),
        ("plora.momentum", ".nan"),
        ("optim.grad_clip", "-.inf"),
        ("resources.cpus_per_worker", ".inf"),
        ("tiny_rope", "inf"),
    ],
)
def test_non_finite_numbers_are_refused_for_every_float_setting(tmp_path, key, text):
    key = "model.tiny.rope_theta" if key == "tiny_rope" else key
    section, name = key.rsplit(".", 1)
    nested = f"{name}: {text}"
    for part in reversed(section.split(".")):
        nested = f"{part}: {{{nested}}}"
    probs = problems_of(tmp_path, nested + "\n")
    assert any(p.startswith(f"{key}: expected a finite number, found ") for p in probs), probs


def test_a_non_finite_override_is_refused_and_blamed_on_it(tmp_path):
    probs = problems_of(tmp_path, {}, {"optim.lr": float("inf")})
    assert probs == [
        "optim.lr: expected a finite number, found inf (set by override optim.lr=.inf)"
    ]


def test_an_override_value_that_is_not_yaml_names_the_key():
    with pytest.raises(ConfigError, match="override seed: expected a YAML value") as err:
        parse_override("seed=!!python/object/apply:os.system [echo]")
    assert "python/object/apply:os.system" in str(err.value)
    with pytest.raises(ConfigError, match="override lora.targets: expected a YAML value"):
        parse_override("lora.targets=[q_proj,")
    with pytest.raises(ConfigError, match="key 'x' given twice"):
        parse_override("eval.num_fewshot={x: 1, x: 2}")
