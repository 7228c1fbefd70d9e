#!/usr/bin/env bash
# The GPU kit (benchmarks/gpu_kit.py): every GPU number of gcl-ops in one command, at most 9
# minutes on one H100 / H200; results, plots and a summary under OUT.
#
#   bash scripts/gpu_check.sh --fetch-wheels wheels/   # here (network): the wheels to carry
#   bash scripts/gpu_check.sh OUT                      # on the GPU machine (no network)
#   bash scripts/gpu_check.sh OUT --dry-run            # the same code at tiny sizes on a CPU (CI)
#
# On the GPU machine the preinstalled torch and triton are used as they are (no .venv: torch is
# too large to carry); the wheels in wheels/ (or $GCL_OPS_WHEELS) are installed first, each on
# its own and without dependencies, so a missing one costs only the parts that need it.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Pure-Python wheels the kit uses beyond torch / triton / numpy (Inf-CL and memeff: the loss
# benchmark's peers; the rest: the GPU tests and the trainer), and compiled ones per Python.
pure=(inf-cl memeff open_clip_torch timm ftfy wcwidth huggingface_hub safetensors pytest pluggy
      iniconfig hypothesis sortedcontainers attrs tqdm packaging filelock fsspec)
compiled=(regex pyyaml safetensors)

if [ "${1:-}" = "--fetch-wheels" ]; then
    dir="${2:?usage: gpu_check.sh --fetch-wheels DIR}"
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps --dest "$dir" "${pure[@]}"
    for version in 3.10 3.11 3.12 3.13; do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" \
            --python-version "$version" --platform manylinux2014_x86_64 "${compiled[@]}" || true
    done
    du -sh "$dir"
    exit 0
fi

out="${1:?usage: gpu_check.sh OUT [--dry-run] | --fetch-wheels DIR}"
shift
if [ "${1:-}" = "--dry-run" ]; then
    source "$repo_root/scripts/env.sh"  # (CI: the project's .venv)
else
    wheels="${GCL_OPS_WHEELS:-$repo_root/wheels}"
    if [ -d "$wheels" ]; then
        for name in "${pure[@]}" "${compiled[@]}"; do
            python3 -m pip install --quiet --no-index --no-deps --find-links "$wheels" "$name" \
                2>/dev/null || echo "[gpu_check] $name: not installed from $wheels"
        done
    fi
    export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$repo_root"
export GCL_OPS_COMMIT="${GCL_OPS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
exec "${PYTHON:-python3}" benchmarks/gpu_kit.py run "$out" "$@"
