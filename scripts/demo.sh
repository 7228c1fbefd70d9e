#!/usr/bin/env bash
# The main job: the gcl-ops demo (the loss checked against its definition, then a short
# benchmark). Extra arguments go to scripts/demo.py.
source "$(dirname "$0")/env.sh"
python scripts/demo.py "$@"
echo
echo "Short benchmark (benchmarks/bench_loss.py --quick; on a GPU run it without --quick):"
python benchmarks/bench_loss.py --quick --no-save
