#!/usr/bin/env bash
# One stage of the GPU checks, sized for one call of the device tool (10 minutes at most):
#
#   bash benchmarks/gpu_session.sh tests       # the whole suite on CUDA: real Triton compiles, CUDA model tests
#   bash benchmarks/gpu_session.sh attention   # bench_attention.py (bf16 and fp16) incl. issue 2's GPU targets
#   bash benchmarks/gpu_session.sh train       # bench_train.py --preset cuda (issue 3's targets)
#   bash benchmarks/gpu_session.sh encoders    # bench_encoders.py fp32 and bf16 (issue 4's targets)
#   bash benchmarks/gpu_session.sh bench       # fastprompt bench on its CUDA defaults (the README headline)
#   bash benchmarks/gpu_session.sh tune        # tune_attention.py: the tile table's candidates, timed
#   bash benchmarks/gpu_session.sh cuda        # shared-prefix decode: grouped Triton path vs per-row (bf16, fp16)
#                                              # and its tests on real kernels
#
# Each stage writes its full output to $OUT/<stage>.txt (or ./gpu-out/ without $OUT), headed by the GPU,
# the commit and the versions, and prints the last lines. The tables go under benchmarks/results/ as
# <device>-<date>-<what>.md, each with the command that printed it.
set -uo pipefail
stage=${1:?"usage: gpu_session.sh tests|attention|train|encoders|bench|tune|cuda"}
out=${OUT:-gpu-out}
mkdir -p "$out"
log="$out/$stage.txt"
export TRITON_DEFAULT_FP_FUSION=1
# the device machine has torch, triton, transformers and peft already; no network, so no dependency resolution
# and no build isolation: the installed setuptools builds the editable install
python -c "import setuptools" 2>/dev/null || { echo "gpu_session.sh: setuptools is not installed here" >&2; exit 1; }
pip install --no-deps --no-build-isolation -e . -q >"$out/pip.txt" 2>&1 || { cat "$out/pip.txt"; exit 1; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  $(date -u +%F)"
    python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} >"$log" 2>&1
rc=0
case "$stage" in
    tests) python -m pytest -q -x --durations=15 -p no:cacheprovider >>"$log" 2>&1 || rc=$? ;;
    attention)
        for dtype in bfloat16 float16; do
            python benchmarks/bench_attention.py --device cuda --dtype "$dtype" >>"$log" 2>&1 || rc=$?
        done ;;
    train) python benchmarks/bench_train.py --preset cuda >>"$log" 2>&1 || rc=$? ;;
    encoders)
        for dtype in float32 bfloat16; do
            python benchmarks/bench_encoders.py --device cuda --dtype "$dtype" --iters 20 >>"$log" 2>&1 || rc=$?
        done ;;
    bench) fastprompt bench --quiet --json "$out/bench.json" >>"$log" 2>&1 || rc=$? ;;
    tune) python benchmarks/tune_attention.py >>"$log" 2>&1 || rc=$? ;;
    cuda)
        python -m pytest -q -x -p no:cacheprovider tests/test_shared_prefix.py >>"$log" 2>&1 || rc=$?
        for dtype in bfloat16 float16; do
            python benchmarks/bench_shared_prefix.py --device cuda --dtype "$dtype" >>"$log" 2>&1 || rc=$?
        done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
tail -n 60 "$log"
echo "stage $stage exit $rc; full output in $log"
exit $rc
