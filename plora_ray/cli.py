"""``plora-ray`` command line: train | eval | search | validate | leaderboard.

Each subcommand's work lives in the module named after it; this file only parses arguments and
imports lazily, so ``plora-ray validate`` answers in a second without importing Ray or DeepSpeed.
"""

from __future__ import annotations

import argparse
import sys

from plora_ray.config import ConfigError, parse_override


def _overrides(pairs: list[str] | None) -> dict[str, object]:
    return dict(parse_override(p) for p in (pairs or []))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="plora-ray", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a run config or search space; exit 1 on problems")
    p.add_argument("files", nargs="+")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("train", help="train one run from a YAML config on Ray")
    p.add_argument("file")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted-key overrides, e.g. lora.rank=8 plora.momentum=0.1",
    )
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
    p.add_argument("file")
    p.add_argument("--storage", default=None, help="local path or s3:// / gs:// URI")
    p.add_argument("--name", default=None)
    p.add_argument("--resume", action="store_true")
    # extend: a job script's own --set (model.path) and the user's --set both apply.
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", action="extend")

    p = sub.add_parser("leaderboard", help="rebuild the leaderboard from search directories")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            from plora_ray.validate import validate_command

            return validate_command(args.files, _overrides(args.set))
        if args.command == "train":
            from plora_ray.train import train_command

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
            )
        if args.command == "leaderboard":
            from plora_ray.leaderboard import leaderboard_command

            return leaderboard_command(args.paths, args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
