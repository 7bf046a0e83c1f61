"""protos/ against buf's default lint rules, and no breaking change against the stored baseline
image of the released API (protos/baseline/, see its README for why an image and not a tag).

The buf CLI comes with the test extras (the PyPI package buf-bin ships its binary), so this
runs wherever the suite does, without npm or a network."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "protos" / "baseline" / "inventory-v1.json"


def buf(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "buf"
    cli = str(beside) if beside.exists() else shutil.which("buf")
    assert cli, "the buf CLI is missing: pip install -e '.[test]' installs it (buf-bin)"
    return subprocess.run([cli, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def copy_of_protos(tmp: Path) -> Path:
    shutil.copy(REPO / "buf.yaml", tmp / "buf.yaml")
    shutil.copytree(REPO / "protos", tmp / "protos")
    return tmp


def test_lint_with_the_default_rules() -> None:
    got = buf("lint")
    assert got.returncode == 0, got.stdout + got.stderr
    config = (REPO / "buf.yaml").read_text()
    assert "STANDARD" in config and "except:" not in config and "ignore" not in config


def test_lint_would_catch_a_violation(tmp_path: Path) -> None:
    """The check is not vacuous: an enum whose zero value is not *_UNSPECIFIED fails it."""
    root = copy_of_protos(tmp_path)
    common = root / "protos" / "inventory" / "v1" / "common.proto"
    common.write_text(common.read_text() + "\nenum Colour {\n  RED = 0;\n}\n")
    got = buf("lint", cwd=root)
    assert got.returncode != 0 and "suffixed with \"_UNSPECIFIED\"" in got.stdout, got.stdout


def test_no_breaking_change_against_the_baseline() -> None:
    got = buf("breaking", "--against", str(BASELINE))
    assert got.returncode == 0, got.stdout + got.stderr


def test_breaking_check_catches_a_renumbered_field(tmp_path: Path) -> None:
    root = copy_of_protos(tmp_path)
    common = root / "protos" / "inventory" / "v1" / "common.proto"
    text = common.read_text()
    assert "  int64 version = 7;" in text
    common.write_text(text.replace("  int64 version = 7;", "  int64 version = 17;"))
    got = buf("breaking", "--against", str(BASELINE), cwd=root)
    assert got.returncode != 0 and '"version"' in got.stdout, got.stdout
