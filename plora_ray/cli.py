"""``plora-ray`` command line: train | eval | search | validate | leaderboard | init.

Each subcommand's work lives in its own module (``train``'s in ``executors``); this file parses
arguments, prints ``train``'s progress lines and imports those modules lazily, so
``plora-ray validate`` answers without importing Ray or DeepSpeed (its pre-flight read of the data
loads ``datasets``, a few seconds).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from plora_ray import __version__
from plora_ray.config import ConfigError, load_config, parse_override
from plora_ray.run_phases import is_phase

SET_HELP = (
    "dotted-key override, e.g. lora.rank=8 (repeatable; one --set may also take several "
    "KEY=VALUE words: --set lora.rank=8 plora.momentum=0.1); later values win"
)


def _overrides(pairs: list[str] | None) -> dict[str, object]:
    """The ``--set`` words as dotted key -> YAML value, in order (a later key wins).

    Raises:
        ConfigError: a word that is not ``KEY=VALUE`` with a YAML value, naming ``--set``.
    """
    try:
        return dict(parse_override(p) for p in (pairs or []))
    except ConfigError as exc:
        raise ConfigError(exc.problems, "--set") from None


def one_value_per_set(argv: Sequence[str]) -> list[str]:
    """Rewrite ``--set A=1 B=2`` as ``--set=A=1 --set=B=2`` so every ``--set`` adds up.

    After ``--set`` come KEY=VALUE words: the first word always (a bad one gets the override's
    own message), each later word only while it holds an ``=`` and is not an option. So
    ``--set k=v FILE`` leaves FILE to the positional arguments instead of reading it as an
    override, and ``--set a=1 --set b=2`` keeps both. Everything after ``--`` is left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            out.extend(argv[i:])
            break
        if word != "--set":
            out.append(word)
            i += 1
            continue
        i += 1
        if i < len(argv) and argv[i] != "--":
            out.append(f"--set={argv[i]}")
            i += 1
            while i < len(argv) and "=" in argv[i] and not argv[i].startswith("-"):
                out.append(f"--set={argv[i]}")
                i += 1
        else:
            out.append(word)  # argparse reports the missing value
    return out


class CliParser(argparse.ArgumentParser):
    """``argparse`` with every ``--set`` adding up and a did-you-mean for a mistyped option or
    subcommand (Python 3.11's argparse has no ``suggest_on_error``)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = sys.argv[1:] if args is None else args
        return super().parse_known_args(one_value_per_set(words), namespace)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self._subcommand_parser(ns) or self
            options = [o for a in chosen._actions for o in a.option_strings]
            hints = []
            for word in extras:
                if word.startswith("-"):
                    hints += difflib.get_close_matches(word.split("=", 1)[0], options, n=1)
            extra = f" (did you mean {' / '.join(hints)}?)" if hints else ""
            chosen.error(f"unrecognized arguments: {' '.join(extras)}{extra}")
        return ns

    def _subcommand_parser(self, ns: argparse.Namespace) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest or "", None) or "")
                return chosen if isinstance(chosen, argparse.ArgumentParser) else None
        return None

    def error(self, message: str) -> NoReturn:
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            choices = re.findall(r"'([^']*)'", bad.group(2))
            close = difflib.get_close_matches(bad.group(1), choices, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        super().error(message)


def build_parser() -> CliParser:
    ap = CliParser(prog="plora-ray", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a run config or search space; exit 1 on problems")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)

    p = sub.add_parser("train", help="train one run from a YAML config on Ray")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--output", default=None, help="output directory (default runs/<config name>)")
    p.add_argument(
        "--resume", action="store_true", help="resume from the newest checkpoint in --output"
    )

    p = sub.add_parser("eval", help="evaluate an exported model directory with lm-eval tasks")
    p.add_argument("--model", required=True, help="directory in the Hugging Face layout")
    p.add_argument(
        "--tasks", default="gsm8k,mmlu", help="comma-separated: gsm8k,mmlu,arc_easy,arc_challenge"
    )
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-format", action="store_true")
    p.add_argument(
        "--data-dir", default=None, help="directory with gsm8k/, mmlu/, arc/ (default: bundled)"
    )
    p.add_argument("--out", default=None, help="write results JSON here")

    p = sub.add_parser("search", help="run a hyperparameter search from a search-space YAML")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--storage", default=None, help="local path or s3:// / gs:// URI")
    p.add_argument(
        "--name",
        default=None,
        help="the search's directory name inside --storage (default: search.name, else the "
        "file's name); no '/', not '.' or '..'",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the search at <storage>/<name>: finished trials are kept, unfinished ones "
        "restart from their newest checkpoint",
    )
    # A job script's own --set (model.path) and the user's --set both apply.
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=SET_HELP + "; search.* keys too, e.g. search.num_samples=16",
    )
    p.add_argument(
        "--extend",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --resume: grow the search without changing it (only search.num_samples=N, "
        "more than before); recorded in search.json and on the leaderboard",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: the trials' worker logs and Ray Tune's status output; -vv: Tune's results too",
    )

    p = sub.add_parser("leaderboard", help="rebuild the leaderboard from search directories")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", default=None)

    p = sub.add_parser("init", help="copy the shipped search spaces into DIR, to edit and run")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite files of the same name")
    return ap


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _progress_line(m: dict[str, Any]) -> str:
    """One line of ``plora-ray train``'s output for a report (a line of metrics.jsonl) or a
    phase (``run_phases``: what the run started doing, during setup and evaluation)."""
    if is_phase(m):
        return f"... {m['phase']} ({_duration(float(m.get('elapsed_s') or 0.0))})"
    if m.get("final"):
        bits = [f"[{m.get('status')}]"]
        if m.get("step") is not None:
            bits.append(f"step {m['step']}")
        if m.get("reason"):
            bits.append(str(m["reason"]).splitlines()[0][:200])
        for k, v in (m.get("objectives") or {}).items():
            bits.append(f"{k}={v:.4g}")
        return "  ".join(bits)
    step, total = int(m["step"]), m.get("total_steps")
    bits = [f"step {step:>6}/{total}" if total else f"step {step:>6}"]
    bits += [
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"stage {m['stage']}",
        f"samples {m['samples']}",
        f"{m['tokens_per_s']:.0f} tok/s",
    ]
    if m.get("unload"):
        bits.append(f"UNLOAD merge_err {m['merge_rel_error']:.2e} rank {m['effective_rank']}")
    if m.get("checkpoint"):
        bits.append("ckpt")
    elapsed = m.get("elapsed_s")
    if total and step > 0 and elapsed is not None:
        # The mean time per step so far; it includes the step reports' checkpoints and proxies.
        bits.append(f"ETA {_duration(float(elapsed) / step * (int(total) - step))}")
    return "  ".join(bits)


def train_command(
    file: str, overrides: dict[str, Any] | None, output: str | None, resume: bool = False
) -> int:
    """``plora-ray train FILE [--set k=v ...] [--output DIR] [--resume]``.

    Validates the config and reads its inputs (``inputs_check``: a ConfigError, exit 2, before
    Ray starts), trains on Ray Train (``executors.run_training``), prints each phase of setup and
    evaluation and a line per report (step N/total with an ETA), and returns 0 when the run
    completed, 1 otherwise.

    Raises:
        ConfigError: the config is invalid (the CLI prints it).
    """
    # Ray, torch and DeepSpeed load for this subcommand only (see the module docstring).
    from plora_ray.executors import run_training
    from plora_ray.inputs_check import check_inputs
    from plora_ray.preflight import check_run_config

    cfg = load_config(file, overrides)
    check_run_config(cfg)
    check_inputs(cfg, file)
    out = Path(output) if output else Path("runs") / Path(file).stem
    engine = (
        f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}" if cfg.deepspeed.enabled else "plain torch"
    )
    print(
        f"plora-ray train: {file} -> {out} ({cfg.method}, {cfg.resources.num_workers} "
        f"worker(s), {engine})",
        flush=True,
    )

    def show(m: dict[str, Any]) -> None:
        print(_progress_line(m), flush=True)

    try:
        res = run_training(cfg, out, report=show, resume=resume)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res.status == "failed" and res.reason:
        print(res.reason, file=sys.stderr)
    print(
        f"done in {res.wall_time_s:.1f} s: status {res.status}; metrics {res.metrics_path}"
        + (f"; model {res.model_path}" if res.model_path else "")
        + (
            f"; checkpoint {res.checkpoint_path} ({res.checkpoint_bytes} bytes)"
            if res.checkpoint_path
            else ""
        ),
        flush=True,
    )
    return 0 if res.status == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit code (argparse exits 2 on a usage error, a ConfigError is
    printed as ``error: ...`` and gives 2)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            from plora_ray.validate import validate_command

            return validate_command(args.files, _overrides(args.set))
        if args.command == "train":
            return train_command(args.file, _overrides(args.set), args.output, resume=args.resume)
        if args.command == "eval":
            from plora_ray.evaluate import eval_command

            return eval_command(args)
        if args.command == "search":
            from plora_ray.search import search_command

            return search_command(
                args.file,
                storage=args.storage,
                name=args.name,
                resume=args.resume,
                overrides=_overrides(args.set),
                verbose=args.verbose,
                extend=_overrides(args.extend),
            )
        if args.command == "leaderboard":
            from plora_ray.leaderboard import leaderboard_command

            return leaderboard_command(args.paths, args.out)
        if args.command == "init":
            from plora_ray.starter_files import init_command

            return init_command(args.directory, force=args.force)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
