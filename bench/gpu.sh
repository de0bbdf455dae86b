#!/usr/bin/env bash
# Everything that needs a GPU, in one call of under 10 minutes (the device tool's machine: Python 3.12,
# torch 2.11, Triton 3.6, peft, transformers, timm; no diffusers or open_clip, so they travel as wheels in .whl/).
# Prepare the wheels once on the development machine (see bench/RESULTS.md, "How the GPU figures are made"), then:
#     run(command="bash bench/gpu.sh", carry=[".whl"])            # every part: about 11 minutes, too long for one call
#     run(command="bash bench/gpu.sh kernels costs", carry=[".whl"]), then the same with "phases fit"
PARTS=${*:-kernels costs phases fit}
want() { [[ " $PARTS " == *" $1 "* ]]; }
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
if want kernels; then
  # 1. kernels on CUDA against their references (the same tests the CPU runs through the interpreter)
  TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -x tests/test_kernels_cfg_ddim.py tests/test_kernels_lora_linear.py \
    tests/test_kernels_temporal_attention.py tests/test_accelerate.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -5
  # 2. the kernel micro-benchmark at ModelScope shapes
  timeout 180 python3 -m bench.bench_kernels --out "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.md" | tail -40
fi
if want costs; then
  # 3. cost comparisons with the CUDA rows (full size, random weights) side by side
  timeout 240 python3 -m pytest -q -s bench/test_costs.py -k "cuda or fullsize" 2>&1 | tee "$OUT/costs.log" | tail -40
fi
if want phases; then
  # 4. time per phase at mid size, the plain diffusers + peft loop beside the engine, the no-grad paths compared
  #    (FLOP shares are counted on the meta device by the CPU run: minutes of Python, not GPU work)
  timeout 300 python3 -m pytest -q -s bench/test_phases.py -k time 2>&1 | tee "$OUT/phases.log" | tail -30
fi
if want fit; then
  # 5. --dry-run's device peak beside torch.cuda.max_memory_allocated of the same step run for real (tiny models of
  #    each family at 33x128x128; about a minute)
  timeout 150 python3 -m bench.fit_cuda --out "$OUT/fit_cuda.json" 2>&1 | tee "$OUT/fit_cuda.log" | tail -8
fi
cp bench/RESULTS.md bench/results_costs.json bench/results_phases_cuda.json "$OUT"/ 2>/dev/null || true
