#!/usr/bin/env bash
# The learner's GPU figures in one run (docs/benchmarks.md, "Learner speed (GPU)"): for the paper-size state config
# and the image config, the whole step captured in one CUDA graph (eager and compiled kernels), then the CUDA tests
# (learner steps on the GPU against the CPU: eager, torch's CUDA graphs, the whole-step graph; GPU sampling against
# host sampling), then torch.compile's own CUDA graphs and the baselines without them. Each bench prints its table,
# last line the headline. The most telling rows come first, so that a run cut short keeps them. Run from the
# repository root:
#
#     bash bench/gpu.sh [PYTHON]     (GPU_LOG=FILE: every line of every row there, torch's warnings included)
set -u
py=${1:-python}
log=${GPU_LOG:-/dev/null}
row() {
    echo "== $*" | tee -a "$log"
    timeout "${ROW_TIMEOUT:-240}" "$py" bench/learner.py --device cuda "$@" 2>&1 | tee -a "$log" | grep -v -e '^W[0-9]' -e '^V[0-9]' | tail -3
}
state=(--config state --sizes paper)
row --config image --steps 300 --bf16 --replay-on-gpu --cuda-graph
row "${state[@]}" --steps 1000 --replay-on-gpu --cuda-graph
row --config image --steps 300 --bf16 --replay-on-gpu --compile default --cuda-graph
row "${state[@]}" --steps 1000 --replay-on-gpu --compile default --cuda-graph
echo "== CUDA tests"
timeout 400 "$py" -m pytest -q -p no:cacheprovider tests/test_image_obs.py tests/test_buffer.py tests/test_prefetch.py \
    tests/test_train_e2e.py -k cuda 2>&1 | tee -a "$log" | tail -4
row --config image --steps 300 --bf16 --replay-on-gpu --compile reduce-overhead
row "${state[@]}" --steps 1000 --replay-on-gpu --compile reduce-overhead
row "${state[@]}" --steps 300
row --config image --steps 60
row "${state[@]}" --steps 300 --replay-on-gpu
row --config image --steps 100 --bf16 --replay-on-gpu
