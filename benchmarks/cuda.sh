#!/usr/bin/env bash
# The CUDA path, measured on a GPU machine: the CUDA tests, the dry run against max_memory_allocated
# (Figure 5 on the GPU), training speed (Figure 6 on the GPU: fp32/TF32, bf16, channels-last, compile,
# against the GPU's measured matmul peak) and the paper's full-resolution step.
#
#   bash benchmarks/cuda.sh OUT [tests] [memory] [speed] [fullres] [demo]   (default: all but demo)
#
# Each section writes its JSON/CSV/PNG and a log under OUT; docs/performance.md and docs/memory.md keep the results.
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda.sh OUT [tests] [memory] [speed] [fullres] [demo]}
shift
sections=${*:-tests memory speed fullres}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
fullres() { python3 -m fullres "$@"; }
run() {  # run NAME CMD...: a section's command, its output also in OUT/NAME.log
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s"
}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
for section in $sections; do
  case $section in
    tests)
      run tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py tests/test_predict.py ;;
    memory)
      run sweep_cuda fullres sweep --device cuda --shapes 64 128 160x160x96 --batches 1 2 --precisions fp32 bf16 \
        --checkpointing-sweep both --channels-last --max-measure 70GiB --out "$out/sweep_cuda" ;;
    speed)
      run bench_64 fullres bench --device cuda --shape 64 64 64 --batch 1 --repeats 5 --warmup 2 --json \
        --chart "$out/figure6_cuda_64.png"
      run bench_128 fullres bench --device cuda --shape 128 128 128 --batch 2 --repeats 5 --warmup 2 \
        --variants plain_fp32 fp32_cl bf16 bf16_cl --json ;;
    fullres)
      # The paper's input at batch 1 (the whole batch of 16 is accumulation of these), no memory strategy.
      run fullres_bench fullres bench --device cuda --shape 240 240 144 --batch 1 --repeats 3 --warmup 1 \
        --variants fp32_cl bf16_cl --json
      run fullres_profile_fp32 fullres profile --device cuda --shape 240 240 144 --batch 1 --channels-last --json
      run fullres_profile_bf16 fullres profile --device cuda --shape 240 240 144 --batch 1 --channels-last \
        --precision bf16 --json ;;
    demo)
      run demo fullres demo --out "$out/demo" --quiet ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
