#!/usr/bin/env bash
# Everything GPU-related in one command, for a machine with an NVIDIA GPU.
set -u

usage() {
    cat <<'USAGE'
Usage: benchmarks/gpu_check.sh OUT_DIR [--quick] [--all-tests]

Runs on a machine with a CUDA GPU, from the repository root, and writes under OUT_DIR:

  env.txt                  GPU, driver, torch, Triton and rnnkit versions
  aot.log                  the ahead-of-time compile of every Triton kernel for this GPU's
                           compute capability (tools/triton_aot.py)
  tests.log                the GPU tests: tests/test_triton_kernels.py on CUDA runs every kernel
                           and the fused layer at real shapes (B=64, H=256 and H=1000) in
                           float32, float64 and bfloat16 against the torch-op twins
  bench_engines_fp32.md    benchmarks/bench_engines.py --device cuda --dtype float32
  bench_engines_bf16.md    benchmarks/bench_engines.py --device cuda --dtype bfloat16
  bench_variants.md        benchmarks/bench_variants.py --device cuda (layer norm, zoneout, ...)
  *.err                    each step's stderr (Triton warnings, tracebacks)
  summary.txt              each step's exit status

Options:
  --quick       fewer shapes and repeats in the benchmarks (a smoke run, minutes)
  --all-tests   run the whole test suite on the GPU machine, not only the GPU tests

Environment: PYTHON (default: .venv/bin/python if present, else python3).
A step that fails does not stop the others; the exit status is 1 when any step failed.
USAGE
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
OUT=$1
shift
QUICK=0
ALL_TESTS=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        --all-tests) ALL_TESTS=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The kernels must compile for the GPU, not run in Triton's interpreter.
unset TRITON_INTERPRET

if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: torch sees no CUDA device; run this on a machine with an NVIDIA GPU" >&2
    exit 2
fi

FAILED=0
: >"$OUT/summary.txt"
step() {  # step NAME OUTFILE COMMAND...: run, keep stdout and stderr, record the status
    local name=$1 out=$2
    shift 2
    echo "== $name -> $out" >&2
    local t0=$SECONDS
    "$@" >"$OUT/$out" 2>"$OUT/$name.err"
    local rc=$?
    echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt" >&2
    [[ $rc -eq 0 ]] || FAILED=1
}

{
    date -u
    nvidia-smi 2>&1 || true
    "$PYTHON" - <<'PY'
import torch, rnnkit
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, rnnkit {rnnkit.__file__}")
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i} {torch.cuda.get_device_name(i)} sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}")
PY
} >"$OUT/env.txt" 2>&1

CC=$("$PYTHON" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
step aot aot.log "$PYTHON" tools/triton_aot.py --targets "$CC" --full -v
if [[ $ALL_TESTS -eq 1 ]]; then
    step tests tests.log "$PYTHON" -m pytest -q -rs tests
else
    step tests tests.log "$PYTHON" -m pytest -q -rs tests/test_triton_kernels.py
fi

BENCH=()
if [[ $QUICK -eq 1 ]]; then
    BENCH=(--shapes 100x64x256 100x1x256 --repeats 3)
fi
step bench_engines_fp32 bench_engines_fp32.md \
    "$PYTHON" benchmarks/bench_engines.py --device cuda --dtype float32 "${BENCH[@]}"
step bench_engines_bf16 bench_engines_bf16.md \
    "$PYTHON" benchmarks/bench_engines.py --device cuda --dtype bfloat16 "${BENCH[@]}"
if [[ $QUICK -eq 1 ]]; then
    step bench_variants bench_variants.md \
        "$PYTHON" benchmarks/bench_variants.py --device cuda --repeats 3
else
    step bench_variants bench_variants.md "$PYTHON" benchmarks/bench_variants.py --device cuda
fi

echo "results in $OUT (summary.txt)" >&2
exit $FAILED
