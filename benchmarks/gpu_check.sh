#!/usr/bin/env bash
# The GPU proof, in one command on a CUDA machine without network access:
#
#   bash benchmarks/gpu_check.sh OUTDIR [SECONDS]
#
# SECONDS (default 540) is the whole budget: every stage gets at most its own cap and never more
# than what is left before the deadline, so the stages that matter most run first and a lent GPU
# of 10 minutes a call is never overrun. Stages, in order of value:
# 1. the device, versions, and its two ceilings (copy bandwidth, bf16 matmul rate);
# 2. installs fusedtx, building fusedtx._C with its CUDA kernels ahead of time (on failure the
#    compiler errors are printed and the tests fall back to the just-in-time build);
# 3. every test that runs on CUDA (cuda-* parametrisations, the Triton kernel tests, GPU-marked
#    tests), in parallel workers                                   -> OUTDIR/tests.log
# 4. every benchmark on CUDA, lean (fewer repetitions, no torch.compile peers where compiling
#    would take the budget)                                          -> OUTDIR/results.csv
# 5. `python -m fusedtx check` on CUDA                               -> OUTDIR/check.json
# 6. compute-sanitizer (memcheck) over a small run of every native CUDA kernel
# Everything is tee'd into OUTDIR/gpu_check.log as it runs, so a time-out still leaves the logs.
# Plots are drawn afterwards from the CSV (python benchmarks/plot.py), wherever it was copied.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [SECONDS]}
BUDGET=${2:-540}
DEADLINE=$(( $(date +%s) + BUDGET ))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stage() { echo; echo "=== $* ($(date -u +%H:%M:%S), $(( DEADLINE - $(date +%s) )) s left)"; }
# capped CAP: seconds a stage may take — CAP, or what is left before the deadline if less.
capped() { local left=$(( DEADLINE - $(date +%s) - 3 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
run_for() { local cap; cap=$(capped "$1"); shift; timeout --kill-after=5 "$cap" "$@"; }

stage "1. device and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv || true
$PY - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
for name in ("transformers", "safetensors", "xdist", "pytest_timeout", "flash_attn", "matplotlib", "tqdm"):
    try:
        m = __import__(name); print(name, getattr(m, "__version__", "present"))
    except ImportError:
        print(name, "missing")
p = torch.cuda.get_device_properties(0)
print("device", p.name, "capability", torch.cuda.get_device_capability(), "SMs", p.multi_processor_count,
      "memory GiB", round(p.total_memory / 2**30, 1))
PY
stage "1b. ceilings"
run_for 40 $PY benchmarks/ceilings.py --device cuda --out "$OUT/results.csv" || echo "ceilings FAILED"

stage "2. install (ahead-of-time build of fusedtx._C with CUDA)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-16}
started=$(date +%s)
if ! run_for 240 $PY -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/build.log" 2>&1; then
    echo "ahead-of-time build FAILED; compiler output:"
    grep -E -B2 -A8 "error|Error" "$OUT/build.log" | tail -60
    FUSEDTX_SKIP_BUILD=1 $PY -m pip install --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1
fi
echo "build took $(( $(date +%s) - started )) s"
$PY -m fusedtx info

stage "3. tests on CUDA"
xdist=(); $PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
tmo=(); $PY -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout 90)
run_for 170 $PY -m pytest -q -rfE -p no:cacheprovider "${xdist[@]}" "${tmo[@]}" --durations=15 \
    -k "(cuda or triton or gpu) and not emulated and not build" tests 2>&1 \
    | tee "$OUT/tests.log" | grep -E "passed|failed|error|FAILED|ERROR" | tail -40

stage "4. benchmarks on CUDA"
lean=(--device cuda --out "$OUT/results.csv" --skip-ceilings --no-plot --min-time 0.1 --min-reps 10)
run_for 90 $PY benchmarks/bench_causal_attention.py "${lean[@]}" \
    --providers fusedtx_triton,fusedtx_triton_batchsplit,fusedtx_native,torch,sdpa_flash,flash_attn \
    || echo "bench causal_attention FAILED or timed out"
run_for 60 $PY benchmarks/bench_linear.py "${lean[@]}" --providers fusedtx_triton,fusedtx_native,torch \
    || echo "bench linear FAILED or timed out"
run_for 45 $PY benchmarks/bench_layer_norm.py "${lean[@]}" || echo "bench layer_norm FAILED or timed out"
run_for 30 $PY benchmarks/bench_rms_norm.py "${lean[@]}" || echo "bench rms_norm FAILED or timed out"
run_for 30 $PY benchmarks/bench_swiglu.py "${lean[@]}" --providers fusedtx_triton,fusedtx_native,torch \
    || echo "bench swiglu FAILED or timed out"
run_for 20 $PY benchmarks/bench_rope.py "${lean[@]}" --providers fusedtx_triton,fusedtx_native,hf_eager \
    || echo "bench rope FAILED or timed out"
run_for 45 $PY benchmarks/bench_softmax.py "${lean[@]}" --providers fusedtx_triton,fusedtx_native,torch \
    || echo "bench softmax FAILED or timed out"
run_for 75 $PY benchmarks/bench_gpt.py --device cuda --out "$OUT/results.csv" --skip-ceilings --no-plot \
    --no-compile --min-reps 3 --min-time 0.3 --providers fusedtx_triton,hf_sdpa,hf_eager \
    || echo "bench gpt FAILED or timed out"
run_for 75 $PY benchmarks/bench_llama.py --device cuda --out "$OUT/results.csv" --skip-ceilings --no-plot \
    --no-compile --min-reps 3 --min-time 0.3 --providers fusedtx_triton,hf_sdpa,hf_eager \
    || echo "bench llama FAILED or timed out"
run_for 20 $PY benchmarks/bench_overhead.py "${lean[@]}" || echo "bench overhead FAILED or timed out"

stage "5. python -m fusedtx check on CUDA"
run_for 60 $PY -m fusedtx check --no-progress --json "$OUT/check.json" || echo "check FAILED or timed out"

stage "6. compute-sanitizer on the native CUDA kernels"
if command -v compute-sanitizer > /dev/null; then
    run_for 45 compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize_cuda.py 2>&1 | tail -12
else
    echo "compute-sanitizer not found"
fi

stage "done"
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/tests.log" | tail -3
ls -la "$OUT"
