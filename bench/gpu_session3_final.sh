#!/usr/bin/env bash
# device call (session 3, final): tests/gpu on a re-converted tiny v8-k256-256 model (uint8 codes), its greedy
# tokens vs the CPU library, and the 7B e2e with the uint8-code v8-k256-256 library
OUT=${1:?}
export PYTHONPATH=$PWD/.carry/tvm_rt:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
V=(python3 -c 'from vptq_mlc.cli import main; main()')
R=.carry/run7
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/env.txt
VPTQ_MLC_GPU_E2E=$R/e2e timeout 200 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tail -n 4 | tee $OUT/pytest.log
"${V[@]}" bench decode $R/e2e/model --lib $R/e2e/model-cuda.so --device cuda --tokens 32 \
  --compare-lib $R/e2e/model-cpu.so --compare-device cpu 2>&1 | tail -n 4 | tee $OUT/tiny_decode.log
timeout 420 "${V[@]}" bench e2e $OUT/e2e_7b.json --steps 64 --no-transformers --system vq $R/vq-cfg $R/k4096-cuda.so \
  --system vq-k256 $R/k256-cfg $R/k256-cuda.so --system fp16 $R/fp16-cfg $R/fp16-cuda.so --device cuda \
  > $OUT/e2e_7b.log 2>&1
tail -n 18 $OUT/e2e_7b.log
