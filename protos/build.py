"""Regenerate the protobuf and gRPC modules from ``protos/pdserve/v1/*.proto``.

Developers run ``python -m protos.build``; ``setup.py`` calls :func:`generate` during every build
(wheel, sdist-to-wheel and PEP 660 editable installs), so the generated files are never committed
or edited by hand. This module does no work at import time and imports nothing outside the
standard library, so ``setup.py`` can load it straight from its file before the project is
installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path("protos", "pdserve", "v1")
"""Folder of the .proto sources, relative to the project root."""

DESCRIPTOR_SET = PROTO_DIR / "descriptor.pb"
"""FileDescriptorSet of every proto (imports included), for reflection and proxies."""

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


GOOGLEAPIS_MARKER = Path("google", "api", "annotations.proto")
"""A file of ``googleapis-common-protos``; the folder that holds it is an include path."""


class ProtoBuildError(RuntimeError):
    """protoc is missing, found no sources, or rejected them."""


def project_root() -> Path:
    """The folder that holds ``protos/`` (this file lives in ``<root>/protos/build.py``)."""
    return Path(__file__).resolve().parent.parent


def proto_sources(root: Path) -> list[Path]:
    """The .proto files to compile, relative to ``root``, in a stable order."""
    return sorted(p.relative_to(root) for p in (root / PROTO_DIR).glob("*.proto"))


def googleapis_include_dir() -> Path:
    """The ``sys.path`` folder holding ``google/api/annotations.proto`` (googleapis-common-protos).

    Found by looking at files rather than importing, so this module stays standard-library only.
    """
    for entry in sys.path:
        folder = Path(entry or ".")
        if (folder / GOOGLEAPIS_MARKER).is_file():
            return folder.resolve()
    raise ProtoBuildError(
        f"{GOOGLEAPIS_MARKER.as_posix()} not found on sys.path "
        "(is googleapis-common-protos installed in this interpreter?)"
    )


def protoc_command(root: Path) -> list[str]:
    """The protoc command line; run it with ``cwd=root``.

    ``-I .`` because the protos import each other as ``"protos/pdserve/v1/common.proto"``; the
    outputs land next to their sources and import as ``protos.pdserve.v1.generation_pb2`` and
    so on. ``google/api/annotations.proto`` (the HTTP annotations Envoy's gRPC-JSON transcoder
    reads) comes from ``googleapis-common-protos``, whose folder is a second include path::

        protos/pdserve/v1/<name>.proto  ->  <name>_pb2.py, <name>_pb2.pyi, <name>_pb2_grpc.py
                                            descriptor.pb  (all files, imports included)
    """
    sources = proto_sources(root)
    if not sources:
        raise ProtoBuildError(f"no .proto files under {root / PROTO_DIR}")
    return [
        sys.executable,
        "-m",
        "grpc_tools.protoc",  # adds the include path of google/protobuf/*.proto by itself
        "-I",
        ".",
        "-I",
        str(googleapis_include_dir()),
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        f"--descriptor_set_out={DESCRIPTOR_SET.as_posix()}",
        "--include_imports",
        *(s.as_posix() for s in sources),
    ]


def _is_generated(path: Path, root: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES) or path == root / DESCRIPTOR_SET


def _generated_files(root: Path) -> list[Path]:
    return [p for p in sorted((root / PROTO_DIR).iterdir()) if _is_generated(p, root)]


def clean(root: Path) -> list[Path]:
    """Delete every generated file under ``PROTO_DIR``; returns what was deleted."""
    removed = []
    for path in _generated_files(root):
        path.unlink()
        removed.append(path.relative_to(root))
    return removed


def generate(root: Path | None = None) -> list[Path]:
    """Compile every proto with grpcio-tools; returns the generated files.

    protoc overwrites its outputs in place (nothing is deleted first, so running processes keep
    finding the modules); outputs of deleted or renamed protos are removed afterwards. Raises
    ProtoBuildError when grpcio-tools is not installed or protoc fails (diagnostics on stderr).
    """
    root = (root or project_root()).resolve()
    command = protoc_command(root)
    try:
        result = subprocess.run(command, cwd=root, check=False)
    except OSError as exc:
        raise ProtoBuildError(f"could not run protoc: {exc}") from exc
    if result.returncode != 0:
        raise ProtoBuildError(
            f"protoc failed with exit code {result.returncode} "
            "(is grpcio-tools installed in this interpreter?): " + " ".join(command)
        )
    stems = {source.stem for source in proto_sources(root)}
    generated = []
    for path in _generated_files(root):
        stem = path.name.removesuffix(".pyi").removesuffix(".py").removesuffix("_grpc")
        if path != root / DESCRIPTOR_SET and stem.removesuffix("_pb2") not in stems:
            path.unlink()  # left over from a proto that no longer exists
        else:
            generated.append(path.relative_to(root))
    return generated


def main(argv: list[str] | None = None) -> int:
    """``python -m protos.build [--clean]``."""
    parser = argparse.ArgumentParser(
        prog="python -m protos.build", description="Regenerate the protobuf and gRPC modules."
    )
    parser.add_argument("--clean", action="store_true", help="only delete the generated files")
    parser.add_argument("--root", type=Path, default=None, help="project root (default: auto)")
    args = parser.parse_args(argv)
    root = (args.root or project_root()).resolve()
    try:
        if args.clean:
            paths = clean(root)
            verb = "removed"
        else:
            paths = generate(root)
            verb = "generated"
    except ProtoBuildError as exc:
        print(f"protos.build: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{verb} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
