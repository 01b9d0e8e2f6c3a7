#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on the lent GPU machine (no network there).
#
#   scripts/fetch_gpu_wheels.sh        fill .whl/ (idempotent: present wheels are kept)
#
# The lent machine's Python 3.12 already holds torch, grpcio, protobuf, tokenizers, safetensors,
# xxhash, nvidia-ml-py and prometheus-client (the device tool's KINDS.md), but not necessarily at
# the versions pinned in pyproject.toml: the generated gRPC/protobuf modules refuse an older
# runtime, so grpcio and protobuf travel too, and transformers at its pin (the engine's model
# loading and attention registration follow transformers' API). Everything else the engine,
# kvtransfer and protos.build import is missing there. Wheels are cp312 manylinux x86-64,
# fetched with --no-deps: each package's needs are listed here by name. .whl/ is ignored
# (.gitignore) and travels only when a device `run` names it in `carry`; the working tree that
# travels is limited to 64 MiB, so the total is printed.
#
# Environment: PYTHON (the pip to use, default .venv/bin/python or python3).
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# NAME==VERSION, the versions of pyproject.toml
WHEELS=(
    pyzmq==27.3.0
    structlog==26.1.0
    cryptography==50.0.2
    cffi==2.0.0
    pycparser==2.23
    gguf==0.19.0
    llguidance==1.9.1
    grpcio==1.85.1
    grpcio-tools==1.85.1
    grpcio-health-checking==1.85.1
    grpcio-reflection==1.85.1
    grpcio-status==1.85.1
    protobuf==7.36.2
    googleapis-common-protos==1.76.0
    transformers==5.23.0
)

PLATFORMS=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    stem=$(echo "$name" | tr '-' '_')
    if compgen -G "$DEST/${stem}-${version}-*.whl" >/dev/null; then
        continue # already here
    fi
    # one version of each: a stale wheel of another version would stop the install there
    rm -f "$DEST/${stem}"-[0-9]*.whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec" \
        2> >(grep -v "is neither a file nor a directory" >&2)
done

ls -1 "$DEST"
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes ($(du -ch "$DEST"/*.whl | tail -1 | cut -f1))"
