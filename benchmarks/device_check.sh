#!/usr/bin/env bash
# The GPU check, in one call of at most 6 minutes on a lent GPU machine (see DEVELOPERS.md):
# build the extension for the card, run the GPU tests, run the GPU benchmarks, write a short table.
# Usage (repo root, on the GPU machine): bash benchmarks/device_check.sh   (results under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/caml_device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# Build: only the card's own architecture, all cores.
arch=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
CAML_OPS_CUDA_ARCHS=$arch MAX_JOBS=16 timeout 120 python3 -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import caml_ops._backend as b; assert b.EXTENSION_HAS_CUDA, 'no CUDA kernels built'; print('built for sm_$arch')"

# GPU tests (the Triton and CUDA backends run on the GPU; CPU tests run too, they are quick here).
timeout 90 python3 -m pytest tests -q -p no:cacheprovider -k "not train and not ddp" 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# GPU benchmarks: time and peak memory, fused vs reference vs official / SDPA, plus bandwidth.
timeout 125 python3 -m pytest benchmarks -q -p no:cacheprovider -k cuda --benchmark-json="$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1 || { status=1; tail -30 "$OUT/bench.log"; }
python3 benchmarks/report.py "$OUT/bench.json" --markdown "$OUT/table.md" --machine "$(head -1 "$OUT/gpu.txt")" \
  && cat "$OUT/table.md"
timeout 25 python3 benchmarks/gpu_bandwidth.py | tee "$OUT/bandwidth.txt"
exit $status
