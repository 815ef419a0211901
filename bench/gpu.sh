#!/usr/bin/env bash
# The learner's GPU figures in one run (docs/benchmarks.md, "Learner speed (GPU)"): eager, then each speed-up, for the
# paper-size state config and the image config, then the CPU-vs-CUDA agreement test. Each bench line ends with its
# headline. About 8 minutes on one H100/H200 (compilation included); run from the repository root:
#
#     bash bench/gpu.sh [PYTHON]
set -u
py=${1:-python}
run() {
    echo "== $*"
    timeout 300 "$py" "$@" 2>&1 | grep -v -e '^W[0-9]' -e '^V[0-9]' | tail -4
}
run bench/learner.py --device cuda --config state --sizes paper --steps 300
run bench/learner.py --device cuda --config state --sizes paper --steps 300 --prefetch --compile default
run bench/learner.py --device cuda --config state --sizes paper --steps 300 --prefetch --compile reduce-overhead
run bench/learner.py --device cuda --config image --steps 60
run bench/learner.py --device cuda --config image --steps 60 --bf16 --prefetch
run bench/learner.py --device cuda --config image --steps 100 --bf16 --prefetch --compile default
run bench/learner.py --device cuda --config image --steps 100 --bf16 --prefetch --compile reduce-overhead
run -m pytest -q tests/test_image_obs.py -k cuda
