#!/usr/bin/env bash
# The GPU proof, in one command of under 10 minutes on a CUDA machine without network access:
#
#   bash benchmarks/gpu_check.sh OUTDIR [STAGES]
#
# STAGES (default "1 2 3 4 5") picks stages, so that the work can be split over two calls of
# under 10 minutes each, e.g. "1 2 3 4" then "2 5" (stage 2 is quick when the build is there).
# 1. the device, versions, and its two ceilings (copy bandwidth, bf16 matmul rate);
# 2. installs fusedtx, building fusedtx._C with its CUDA kernels ahead of time (falls back to
#    the just-in-time build, printing the compiler errors);
# 3. the whole test suite on CUDA (GPU-marked tests included)        -> OUTDIR/tests.log
# 4. compute-sanitizer over a small run of every native CUDA kernel  -> in OUTDIR/gpu_check.log
# 5. every benchmark on CUDA                                         -> OUTDIR/results.csv, plots.tar
# Everything is tee'd into OUTDIR as it runs, so a time-out still leaves the logs. Copy the CSV
# rows into benchmarks/results/results.csv and commit them with the plots.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [STAGES]}
STAGES=" ${2:-1 2 3 4 5} "
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
unset TRITON_INTERPRET
PY=${PYTHON:-python}
stage() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
want() { [[ "$STAGES" == *" $1 "* ]]; }

if want 1; then
stage "1. device and versions"
nvidia-smi || true
$PY - <<'PY'
import torch, platform
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PY
stage "1b. ceilings"
$PY benchmarks/ceilings.py --device cuda --out "$OUT/results.csv" || echo "ceilings FAILED"
fi

if want 2; then
stage "2. install (ahead-of-time build of fusedtx._C with CUDA)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-16}
if ! timeout 420 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
    echo "ahead-of-time build FAILED; compiler output:"
    grep -E -B2 -A8 "error|Error" "$OUT/build.log" | tail -80
    echo "falling back to a pure-Python install and the just-in-time build"
    FUSEDTX_SKIP_BUILD=1 $PY -m pip install --no-deps --no-build-isolation -e . > /dev/null 2>&1
fi
tail -3 "$OUT/build.log"
$PY -m fusedtx info
fi

if want 3; then
stage "3. tests on CUDA"
timeout 300 $PY -m pytest -q -rs -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/tests.log" | tail -60
fi

if want 4; then
stage "4. compute-sanitizer on the native CUDA kernels"
if command -v compute-sanitizer > /dev/null; then
    timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $PY - <<'PY' 2>&1 | tail -15
import torch, fusedtx
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape, causal in (((5, 3, 1000), False), ((2, 37, 64), True), ((3, 9000), False)):
        x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        y = fusedtx.softmax(x, scale=0.5, causal=causal, backend="native")
        y.backward(torch.randn_like(y))
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for rows, n in ((5, 7), (300, 768), (3, 20000)):
        x = torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        y = fusedtx.layer_norm(x, n, w, b, backend="native")
        y.backward(torch.randn_like(y))
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for m, k, n, act in ((1, 7, 5, "gelu"), (130, 300, 129, "gelu_tanh"), (3, 768, 50257, None)):
        x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        y = fusedtx.linear(x, w, b, activation=act, backend="native")
        y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("sanitizer run finished")
PY
else
    echo "compute-sanitizer not found"
fi
fi

if want 5; then
stage "5. benchmarks on CUDA"
# One time limit per script, so that a slow one cannot starve the others; plots at the end.
for spec in softmax:100 layer_norm:100 linear:200; do
    timeout "${spec#*:}" $PY benchmarks/run_all.py --device cuda --out "$OUT/results.csv" --skip-ceilings \
        --no-plot --only "${spec%%:*}" || echo "bench ${spec%%:*} FAILED or timed out"
done
$PY benchmarks/plot.py --csv "$OUT/results.csv" --out-dir "$OUT" || echo "plots FAILED"
tar -cf "$OUT/plots.tar" -C "$OUT" $(cd "$OUT" && ls *.png 2>/dev/null) 2>/dev/null && rm -f "$OUT"/*.png
fi
stage "done"
ls -la "$OUT"
