"""The wheel carries what `callgate datasette` reads at run time, not only the editable tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from analytics.datasette_app import METADATA_PATH, PLUGINS_DIR, TEMPLATES_DIR

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_metadata_and_datasette_plugins(tmp_path: Path) -> None:
    # Build from a copy: setuptools reuses a build/ directory left in the tree, which
    # would hide a file the current configuration no longer ships.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "data", "out", "__pycache__", "*.egg-info", "test-artifacts"
        ),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
        timeout=240,
    )
    (wheel,) = wheels.glob("callgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped_metadata = archive.read("analytics/metadata.yml")
        plugins = {name for name in names if name.startswith("analytics/datasette_plugins/")}
    assert shipped_metadata == (ROOT / "metadata.yml").read_bytes() == METADATA_PATH.read_bytes()
    expected = {f"analytics/datasette_plugins/{p.name}" for p in PLUGINS_DIR.glob("*.py")}
    assert expected and expected <= plugins
    templates = {f"analytics/templates/{p.name}" for p in TEMPLATES_DIR.glob("*.html")}
    assert templates and templates <= names
