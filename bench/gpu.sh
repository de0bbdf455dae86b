#!/usr/bin/env bash
# Everything that needs a GPU, in two calls of under 10 minutes each (the device tool's machine: Python 3.12,
# torch 2.11, Triton 3.6, peft, transformers, timm; no diffusers, open_clip or xformers, so they travel as wheels
# in .whl/, about 11 MB). Make the wheels once on the development machine, where pip reaches the registries:
#     bash bench/gpu.sh wheels                                      # the versions installed here, for Python 3.12
# then on the GPU:
#     run(command="bash bench/gpu.sh kernels costs", carry=[".whl"]), then the same with "phases fit xformers"
# (no GPU has run it yet: each part's timeout bounds it, and each call's add up to under 10 minutes)
# xformers 0.0.35 (built for torch 2.10) imports beside a newer torch without its C++ extension, and lists its
# memory-efficient attention on the kernels PyTorch bundles as available (`python -m xformers.info`: cutlassF-pt,
# fa2F-pt); bench_kernels' temporal-attention rows and bench.attention_cuda include it. PyAV stays behind (36 MB):
# nothing here decodes or writes video.
if [ "${1:-}" = wheels ]; then
  pins=$(python3 -m pip list --format=freeze | grep -i -E '^(diffusers|open.clip.torch|ftfy|wcwidth)==')
  [ "$(wc -w <<< "$pins")" = 4 ] || { echo "bench/gpu.sh wheels: diffusers, open_clip_torch, ftfy and wcwidth must be installed here (found: ${pins:-none}); pip install -e '.[test]' first" >&2; exit 2; }
  rm -rf .whl  # one version of each: two stop the install there
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $pins xformers==0.0.35
fi
PARTS=${*:-kernels costs phases fit xformers}
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
timeout 30 python3 -m engine.doctor > "$OUT/doctor.txt" 2>&1; grep -E "^(  (torch|triton|xformers) |attention|--attention)" "$OUT/doctor.txt"
if want kernels; then
  # 1. kernels on CUDA against their references (the same tests the CPU runs through the interpreter)
  TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -x tests/test_kernels_cfg_ddim.py tests/test_kernels_lora_linear.py \
    tests/test_kernels_temporal_attention.py tests/test_accelerate.py tests/test_doctor.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -5
  # 2. the kernel micro-benchmark at ModelScope shapes
  timeout 180 python3 -m bench.bench_kernels --out "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.md" | tail -40
fi
if want costs; then
  # 3. cost comparisons with the CUDA rows (full size, random weights) side by side
  timeout 210 python3 -m pytest -q -s bench/test_costs.py -k "cuda or fullsize" 2>&1 | tee "$OUT/costs.log" | tail -40
fi
if want phases; then
  # 4. time per phase at mid size, the plain diffusers + peft loop beside the engine, the no-grad paths compared
  #    (FLOP shares are counted on the meta device by the CPU run: minutes of Python, not GPU work)
  timeout 270 python3 -m pytest -q -s bench/test_phases.py -k time 2>&1 | tee "$OUT/phases.log" | tail -30
fi
if want fit; then
  # 5. --dry-run's device peak beside torch.cuda.max_memory_allocated of the same step run for real (tiny models of
  #    each family at 33x128x128; about a minute)
  timeout 150 python3 -m bench.fit_cuda --out "$OUT/fit_cuda.json" 2>&1 | tee "$OUT/fit_cuda.log" | tail -8
fi
if want xformers; then
  # 6. the mid-size UNet's step with SDPA, --attention xformers and the fused temporal attention side by side
  #    (which backend each ran, predictions against SDPA's, time, peak memory; under a minute)
  timeout 120 python3 -m bench.attention_cuda --out "$OUT/attention_cuda.json" 2>&1 | tee "$OUT/attention_cuda.log" | tail -8
fi
cp bench/RESULTS.md bench/results_costs.json bench/results_phases_cuda.json "$OUT"/ 2>/dev/null || true
