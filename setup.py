"""Build hook: compile protos/ into the `inventory.v1` Python package.

Generated code is never committed. A regular install writes it into the build directory; an
editable install (`pip install -e .`) writes it next to the sources, where .gitignore hides it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"


def compile_protos(out_dir: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    target = out_dir / "inventory" / "v1"
    target.mkdir(parents=True, exist_ok=True)
    (target / "py.typed").touch()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *_mypy_stub_args(out_dir),
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")


def _mypy_stub_args(out_dir: Path) -> list[str]:
    """Typed stubs (.pyi) via mypy-protobuf's plugins, found next to this interpreter or on PATH."""
    args = []
    for name, flag in (("protoc-gen-mypy", "mypy_out"), ("protoc-gen-mypy_grpc", "mypy_grpc_out")):
        plugin = Path(sys.executable).parent / name
        found = str(plugin) if plugin.exists() else shutil.which(name)
        if found:
            args += [f"--plugin={name}={found}", f"--{flag}={out_dir}"]
    return args


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos(ROOT if self.editable_mode else Path(self.build_lib))
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
