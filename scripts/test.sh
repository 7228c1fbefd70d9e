#!/usr/bin/env bash
# Runs the whole test suite on the CPU (Triton kernels under the interpreter); GPU tests skip
# without CUDA. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
exec python -m pytest "$@"
