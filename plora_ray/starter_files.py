"""``plora-ray init DIR``: copy the shipped search spaces where a user can edit and run them.

README's commands name ``search_spaces/smoke.yaml`` and friends, which a checkout has at its top
but an installed wheel keeps inside the package (``plora_ray/search_spaces/``, mapped there by
pyproject's ``package-dir``). ``init`` copies them from the installed package (read through
``importlib.resources``), or from the checkout when the package was installed in editable mode.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["copy_search_spaces", "init_command", "shipped_search_spaces"]

# A checkout's search spaces; an editable install does not map plora_ray.search_spaces.
CHECKOUT_SEARCH_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def shipped_search_spaces() -> Traversable:
    """The directory of the shipped search-space YAMLs: the package's, else the checkout's.

    Raises:
        FileNotFoundError: neither exists (a broken installation).
    """
    packaged = files("plora_ray") / "search_spaces"
    if packaged.is_dir():
        return packaged
    if CHECKOUT_SEARCH_SPACES.is_dir():
        return CHECKOUT_SEARCH_SPACES
    raise FileNotFoundError(
        "plora_ray/search_spaces: expected the shipped search spaces in the installed package, "
        "found none (reinstall plora-ray)"
    )


def copy_search_spaces(dest: Path, *, force: bool = False) -> list[Path]:
    """Copy every shipped ``*.yaml`` search space into ``dest`` (created when missing).

    Args:
        dest: the target directory.
        force: overwrite files of the same name; without it nothing is copied when any exists.

    Returns:
        The files written, sorted.

    Raises:
        FileExistsError: a target file exists and ``force`` is False (names every such file).
        NotADirectoryError: ``dest`` exists and is not a directory.
    """
    sources = sorted(
        (f for f in shipped_search_spaces().iterdir() if f.name.endswith(".yaml")),
        key=lambda f: f.name,
    )
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest}: expected a directory, found a file")
    existing = [dest / f.name for f in sources if (dest / f.name).exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise FileExistsError(
            f"{dest}: expected no files named like the shipped search spaces, found {names} "
            "(pass --force to overwrite them)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for f in sources:
        target = dest / f.name
        target.write_bytes(f.read_bytes())
        written.append(target)
    return written


def init_command(directory: str, force: bool = False) -> int:
    """``plora-ray init DIR [--force]``: copy the search spaces, print them and what to run next.

    Returns:
        0 when copied, 2 when a file exists (without ``--force``) or DIR is a file.
    """
    dest = Path(directory)
    try:
        written = copy_search_spaces(dest, force=force)
    except (FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"copied {len(written)} search spaces into {dest}:")
    for path in written:
        print(f"  {path}")
    smoke = dest / "smoke.yaml"
    print("next: check one, then run it (each file's header says how long it takes):")
    print(f"  plora-ray validate {smoke}")
    print(f"  plora-ray search {smoke}")
    return 0
