#!/usr/bin/env bash
# The main job, on the tiny model and a CPU: make a synthetic MarqoGS-10M-shaped dataset, train
# multi-field GCL on it, evaluate the four splits (the paper's Table 4 layout), then the loss
# checked against its float64 definition and a short loss benchmark. Everything goes to
# runs/demo/ (DEMO_DIR overrides it). About 3.5 minutes on 2 cores after the first install.
source "$(dirname "$0")/env.sh"
work="${DEMO_DIR:-runs/demo}"
rm -rf "$work"
echo "== 1/4 synthetic dataset"
python -m reference_trainer make-synthetic "$work/data" docs_per_query=100
echo "== 2/4 training (tiny open_clip model, inverse weights, gradient caching; the recipe study's winner)"
python -m reference_trainer train --data "$work/data" --out "$work/run" \
    --config reference_trainer/configs/tiny.yaml "$@"
echo "== 3/4 evaluation (in-domain, novel query, novel document, zero-shot)"
python -m reference_trainer eval --data "$work/data" --checkpoint "$work/run" --out "$work/eval"
echo "== 4/4 the loss: fused vs naive against float64, then a short benchmark"
python scripts/demo.py --n 2048 --k 256
python benchmarks/bench_loss.py --quick --no-save
