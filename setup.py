"""Build hook: compile the protos with grpcio-tools before the Python files are collected.

All metadata lives in pyproject.toml. This file only swaps in a ``build_py`` that first runs
``protos.build.generate`` (the same code as ``python -m protos.build``). setuptools runs
``build_py`` for wheels, for wheels built from an sdist, and, in editable mode, for PEP 660
editable installs (``pip install -e .``), so every install path gets fresh generated modules.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_protos_build() -> ModuleType:
    # Loaded from its file rather than imported: the project is not on sys.path yet while the
    # build backend runs, and this keeps `protos/__init__.py` out of the build.
    path = ROOT / "protos" / "build.py"
    spec = importlib.util.spec_from_file_location("_pdserve_protos_build", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """``build_py`` that regenerates ``protos/pdserve/v1/*_pb2*.py`` and ``descriptor.pb`` first."""

    def run(self) -> None:
        protos_build = _load_protos_build()
        for path in protos_build.generate(ROOT):
            self.announce(f"generated {path}", level=2)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
