"""``plora-ray init DIR`` and the wheel: the shipped search spaces travel in the package and
``init`` copies them from the installed package (importlib.resources), refusing to overwrite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from plora_ray import cli

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))


def test_init_copies_every_shipped_search_space_and_says_what_to_run(tmp_path, capsys) -> None:
    assert cli.main(["init", str(tmp_path / "spaces")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "spaces").iterdir()) == SHIPPED
    for name in SHIPPED:
        assert (tmp_path / "spaces" / name).read_bytes() == (
            ROOT / "search_spaces" / name
        ).read_bytes()
        assert str(tmp_path / "spaces" / name) in out
    assert f"plora-ray validate {tmp_path / 'spaces' / 'smoke.yaml'}" in out


def test_init_refuses_to_overwrite_unless_forced(tmp_path, capsys) -> None:
    dest = tmp_path / "spaces"
    dest.mkdir()
    (dest / "smoke.yaml").write_text("mine\n")
    assert cli.main(["init", str(dest)]) == 2
    err = capsys.readouterr().err
    assert f"found {dest / 'smoke.yaml'} (pass --force to overwrite them)" in err
    assert (dest / "smoke.yaml").read_text() == "mine\n"
    assert sorted(p.name for p in dest.iterdir()) == ["smoke.yaml"]  # nothing copied
    assert cli.main(["init", str(dest), "--force"]) == 0
    assert (dest / "smoke.yaml").read_bytes() == (
        ROOT / "search_spaces" / "smoke.yaml"
    ).read_bytes()


@pytest.mark.slow
def test_the_wheel_ships_the_search_spaces_and_init_reads_them_from_the_package(tmp_path) -> None:
    wheel_dir, site, src = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    junk = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs", "out")
    shutil.copytree(ROOT, src, ignore=junk)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        pip + ["wheel", str(src), "-w", str(wheel_dir), "--no-deps", "--no-build-isolation", "-q"],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("plora_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"plora_ray/search_spaces/{name}" in names
    # Every module of the package is in the wheel (pyproject lists the packages by hand).
    for py in (ROOT / "plora_ray").rglob("*.py"):
        assert py.relative_to(ROOT).as_posix() in names
    assert not any(n.startswith("benchmarks/") for n in names)

    subprocess.run(
        pip + ["install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    # The installed copy comes first on the path (the checkout's editable finder comes later).
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import sys, plora_ray.starter_files as s; from plora_ray.cli import main; "
        "print(s.__file__, s.shipped_search_spaces()); sys.exit(main(['init', sys.argv[1]]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "spaces")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    module, source = res.stdout.splitlines()[0].split()
    assert module.startswith(str(site)) and source.startswith(str(site))
    assert sorted(p.name for p in (tmp_path / "spaces").iterdir()) == SHIPPED
