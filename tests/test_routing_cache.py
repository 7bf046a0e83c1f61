"""The image's numba cache is built for the `routing` the service really imports.

numba keys its on-disk cache by the directory of the source it compiled: a cache warmed for a
source tree (/app/routing) is never used by the installed package (site-packages/routing), and
every pod would compile again for about a minute. This installs the project non-editable into a
scratch virtualenv (on top of this one, so nothing is downloaded), runs the Dockerfile's warm-up
command there with a fresh NUMBA_CACHE_DIR, and checks that a fresh process then compiles nothing.
One kernel module (routing.evaluate) stands for all of them, to keep the compile short: the cache
location depends on the directory, which all kernel modules share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBSET = ["--modules", "routing.evaluate"]
WARM = re.compile(r"^RUN python -m routing\.warm (?P<args>--require-installed)\b", re.M)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv holding a non-editable install of this repository; the project venv's
    packages (numba, grpc, ...) are visible behind it."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the work tree
    src.mkdir()
    keep = ("pyproject.toml", "setup.py", "README.md", "protos", "inventory", "inventory_svc",
            "routing", "benchmarks")
    for name in keep:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "out"))
        else:
            shutil.copy2(path, src / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    # A plain path line: the project venv's own .pth files (its editable install of this repo)
    # are not processed, so `routing` can only come from the scratch install.
    (site / "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--ignore-installed", "--no-compile", "--disable-pip-version-check", str(src)],
        check=True, cwd=root, env=_env(root / "unused-cache"), timeout=300)
    yield python


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PYTHON"))}
    return {**env, "NUMBA_CACHE_DIR": str(cache), **extra}


def _warm(python: Path, cwd: Path, cache: Path, *args: str, **env: str) -> dict[str, object]:
    run = subprocess.run([str(python), "-m", "routing.warm", "--json", *SUBSET, *args],
                         cwd=cwd, env=_env(cache, **env), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    done: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    assert done["event"] == "done"
    return done


def _files(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*")
            if p.is_file()}


def test_dockerfile_warms_the_installed_package_from_outside_any_source_tree() -> None:
    text = (REPO / "Dockerfile").read_text()
    runtime = text.rsplit("\nFROM ", 1)[1]  # the last stage is what runs
    found = WARM.search(runtime)
    assert found, "the runtime stage must warm the cache with python -m routing.warm"
    workdirs = re.findall(r"^WORKDIR (\S+)", runtime[:found.start()], re.M)
    assert workdirs and workdirs[-1] == "/", "warm from /, where no `routing` source tree is"
    assert not re.search(r"^COPY (?!--from=build /wheels)", runtime, re.M), \
        "the runtime stage must not carry a source tree a warm-up could compile instead"


def test_cache_warmed_like_the_image_is_used_by_a_fresh_process(scratch: Path,
                                                                tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    warmed = _warm(scratch, elsewhere, cache, "--require-installed")  # as the Dockerfile does
    assert warmed["compiled"] == 5 and warmed["saved"]
    routing_dir = Path(str(warmed["routing_dir"]))
    assert "site-packages" in routing_dir.parts and not routing_dir.is_relative_to(REPO)
    files = _files(cache)
    assert any(name.endswith(".nbi") for name in files)

    again = _warm(scratch, elsewhere, cache)  # a pod starting: a fresh process
    assert (again["compiled"], again["loaded"]) == (0, 5)
    assert _files(cache) == files, "the fresh process wrote to the cache: it compiled"


def test_a_cache_warmed_for_a_source_tree_is_not_used_by_the_installed_package(
        scratch: Path, tmp_path: Path) -> None:
    """The mistake the image must not make, shown to be one (and this test able to see it)."""
    cache = tmp_path / "numba-cache"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    tree = _warm(scratch, REPO, cache)  # run inside the source tree: `routing` is the tree's
    assert Path(str(tree["routing_dir"])) == REPO / "routing"
    refused = subprocess.run([str(scratch), "-m", "routing.warm", "--require-installed", *SUBSET],
                             cwd=REPO, env=_env(cache), capture_output=True, text=True)
    assert refused.returncode == 2 and "not the installed package" in refused.stderr
    installed = _warm(scratch, elsewhere, cache)
    assert installed["compiled"] == 5, "the installed package found the source tree's cache"
