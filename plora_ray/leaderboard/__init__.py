"""Leaderboard: a search's finished trials -> JSON, CSV, Markdown, a self-contained HTML page and
the best configuration as a runnable YAML.

Output goes to ``<search_dir>/leaderboard/``: ``leaderboard.json``, ``leaderboard.csv``,
``leaderboard.md``, ``index.html``, ``best_config.yaml``. The fields of ``leaderboard.json`` (and
its ``version``) are documented in ``docs/leaderboard_json.md``.

- ``rank``: a trial's score, Pareto fronts, the board order, the gain over the baselines.
- ``board``: reading search directories (one or several) into one ranked ``Board``.
- ``tables``: cell formatting, CSV, Markdown and ``best_config.yaml``.
- ``lineage``: a ``pbt_unload`` trial's forks, stage by stage, as text for every format.
- ``plots``: the inline SVG plots.
- ``html``: the HTML page.
- ``publish``: writing the files (``publish``, called by the search) and the CLI command.
"""

from plora_ray.leaderboard.board import (
    FORMAT_VERSION,
    Board,
    Cost,
    LeaderboardError,
    SearchInfo,
    build_leaderboard,
)
from plora_ray.leaderboard.generations import (
    CURRENT_LINK,
    CURRENT_POINTER,
    GENERATIONS_DIR,
    PUBLISH_EXIT_ENV,
)
from plora_ray.leaderboard.html import json_for_script, render_html
from plora_ray.leaderboard.plots import (
    MIN_IMPORTANCE_TRIALS,
    Importances,
    nice_ticks,
    param_importances,
    study_importances,
)
from plora_ray.leaderboard.publish import (
    LEADERBOARD_DIR,
    OUTPUT_FILES,
    leaderboard_command,
    publish,
    write_board,
)
from plora_ray.leaderboard.rank import Row, baseline_gains, pareto_fronts, rank_rows, score
from plora_ray.leaderboard.tables import render_best_config, render_csv, render_markdown

__all__ = [
    "CURRENT_LINK",
    "CURRENT_POINTER",
    "FORMAT_VERSION",
    "GENERATIONS_DIR",
    "LEADERBOARD_DIR",
    "MIN_IMPORTANCE_TRIALS",
    "OUTPUT_FILES",
    "PUBLISH_EXIT_ENV",
    "Board",
    "Cost",
    "Importances",
    "LeaderboardError",
    "Row",
    "SearchInfo",
    "baseline_gains",
    "build_leaderboard",
    "json_for_script",
    "leaderboard_command",
    "nice_ticks",
    "param_importances",
    "pareto_fronts",
    "publish",
    "rank_rows",
    "render_best_config",
    "render_csv",
    "render_html",
    "render_markdown",
    "score",
    "study_importances",
    "write_board",
]
