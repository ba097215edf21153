"""The command line: every --set adds up in any order, --version, help, did-you-mean, and
messages (never tracebacks) for bad user input. Fast: plora_ray.cli.main in this process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from plora_ray import __version__, cli
from plora_ray.store import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def exit_code(argv: list[str]) -> int:
    """main's exit code, whether it returns it or argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_version_prints_the_package_version(capsys) -> None:
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"plora-ray {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "{f}", "--set", "lora.rank=0", "--set", "plora.momentum=1.5"],
        ["validate", "--set", "lora.rank=0", "--set", "plora.momentum=1.5", "{f}"],
        ["validate", "--set", "lora.rank=0", "plora.momentum=1.5", "{f}"],
        ["validate", "--set", "lora.rank=0", "{f}", "--set", "plora.momentum=1.5"],
    ],
    ids=["after-file", "before-file", "one-set-two-words", "around-file"],
)
def test_every_set_of_validate_applies_in_any_order(tmp_path, capsys, argv) -> None:
    f = write_yaml(tmp_path / "run.yaml", {"lora": {"rank": 4}})
    assert exit_code([str(f) if a == "{f}" else a for a in argv]) == 1
    err = capsys.readouterr().err
    assert "lora.rank: expected an integer >= 1, found 0 (set by override lora.rank=0)" in err
    assert "plora.momentum: expected a number in [0, 1), found 1.5" in err


@pytest.mark.parametrize("sub", ["train", "validate", "search"])
def test_set_before_the_file_leaves_the_file_positional(sub: str) -> None:
    args = cli.build_parser().parse_args([sub, "--set", "a=1", "b=2", "f.yaml", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    assert (args.files if sub == "validate" else [args.file]) == ["f.yaml"]


def test_train_keeps_every_set_and_reports_them_before_ray(tmp_path, capsys) -> None:
    f = write_yaml(tmp_path / "run.yaml", {"lora": {"rank": 4}})
    argv = ["train", "--set", "lora.rank=0", str(f), "--set", "plora.momentum=1.5"]
    assert cli.main(argv + ["--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "(set by override lora.rank=0)" in err and "(set by override plora.momentum=1.5)" in err
    assert not (tmp_path / "out").exists()


def test_a_mistyped_option_or_subcommand_gets_a_suggestion(capsys) -> None:
    assert exit_code(["search", "space.yaml", "--nmae", "x"]) == 2
    assert "unrecognized arguments: --nmae x (did you mean --name?)" in capsys.readouterr().err
    assert exit_code(["train", "run.yaml", "--outptu", "x"]) == 2
    assert "(did you mean --output?)" in capsys.readouterr().err
    assert exit_code(["serach", "space.yaml"]) == 2
    assert "(did you mean 'search'?)" in capsys.readouterr().err


def test_search_options_have_help(capsys) -> None:
    assert exit_code(["search", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--name NAME the search's directory name inside --storage" in out
    assert "--resume continue the search at <storage>/<name>" in out
    assert "--set KEY=VALUE dotted-key override" in out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=!!python/object/apply:os.system [echo]", "override seed: expected a YAML value"),
        ("lora.targets=[q_proj,", "override lora.targets: expected a YAML value"),
        ("lora.rank", "expected dotted.key=value, found no '='"),
    ],
)
def test_a_bad_set_value_is_a_message_naming_the_key(tmp_path, capsys, override, expected):
    f = write_yaml(tmp_path / "run.yaml", {})
    assert exit_code(["validate", str(f), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem(s) in --set:") and expected in err, err
    assert "Traceback" not in err


def test_validate_refuses_a_search_override_that_search_refuses(capsys) -> None:
    assert exit_code(["validate", str(SMOKE), "--set", "search.algorithm=cmaes"]) == 1
    err = capsys.readouterr().err
    assert "search.algorithm: expected one of tpe, nsga2, motpe, random, grid, found 'cmaes'" in err
    # A search.* override makes validate check the search block as search does, even when the
    # file has none.
    assert exit_code(["validate", str(SMOKE), "--set", "search.params.optim.lr.low=-1"]) == 1
    assert "search.params.optim.lr.low: expected a number > 0 for a log scale" in (
        capsys.readouterr().err
    )


def test_a_step_line_shows_step_of_total_and_an_eta_and_a_phase_its_name() -> None:
    step = {"step": 10, "total_steps": 40, "loss": 1.0, "lr": 1e-3, "stage": 2, "samples": 80}
    line = cli._progress_line({**step, "tokens_per_s": 900.0, "elapsed_s": 20.0})
    assert line.startswith("step     10/40  loss 1.0000") and line.endswith("ETA 1m00s")
    assert cli._progress_line({"phase": "loading the model", "elapsed_s": 3.4}) == (
        "... loading the model (3s)"
    )


@pytest.mark.slow
def test_train_prints_its_phases_and_step_of_total_with_an_eta(tmp_path, capsys) -> None:
    sets = ["train.max_steps=4", "train.log_every=2", "eval.tasks=[gsm8k]", "eval.limit=2"]
    sets += ["eval.max_gen_toks=8"]
    argv = ["train", str(SMOKE), "--output", str(tmp_path / "run"), "--set", *sets]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for phase in (
        "... starting Ray",
        "... loading the model and tokenizer",
        "... reading and tokenizing the data",
        "... building the DeepSpeed engine (ZeRO-2)",
        "... evaluating gsm8k (2 documents per task",
    ):
        assert phase in out, out
    assert re.search(r"step +2/4 .* ETA \d+s", out), out
    # Phases are not steps: metrics.jsonl holds the step reports and the final one only.
    reports = read_metrics(tmp_path / "run")
    assert all("phase" not in r for r in reports) and reports[-1]["final"]
    assert [r["total_steps"] for r in reports[:-1]] == [4] * (len(reports) - 1)
