#!/usr/bin/env bash
# One device call: everything the GPU host checks and times (artifacts built on the build box under .carry/).
# Usage on the GPU host, from the repo root: bash bench/gpu_run.sh OUT_DIR [steps...]
# steps: check kernels e2e pytest (default: all); cs (code-sorted K=65536 kernel, library in $KCS or .carry/kcs). Needs .carry/tvm_rt (vptq-mlc runtime-bundle --python 3.12).
set -o pipefail
OUT=${1:?out dir}; shift
STEPS=${*:-"check kernels e2e pytest"}
export PYTHONPATH=$PWD/.carry/tvm_rt:$PWD PYTHONUNBUFFERED=1
VM="python3 -c 'from vptq_mlc.cli import main; main()'"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee $OUT/env.txt
python3 -c "import tvm, torch; print('tvm runtime-only:', tvm.base._RUNTIME_ONLY, '| torch', torch.__version__)" | tee -a $OUT/env.txt
for s in $STEPS; do
  case $s in
    check) eval $VM bench check .carry/kcheck --json $OUT/check.json 2>&1 | tail -n 8 | tee $OUT/check.log ;;
    kernels) eval $VM bench kernels ${KBENCH:-.carry/kbench} --json $OUT/kernels.json 2>&1 | tee $OUT/kernels.log ;;
    e2e) E=.carry/issue10/e2e; CMP=""; [ -f $E/model-cpu.so ] && CMP="--compare-lib $E/model-cpu.so --compare-device cpu"
         eval $VM bench decode $E/model --lib $E/model-cuda.so --device cuda --tokens 32 $CMP 2>&1 | tee $OUT/e2e.log ;;
    cs) K=${KCS:-.carry/kcs}   # code-sorted K=65536 kernel: timings next to the gather GEMV and fp16, then correctness
        eval $VM bench kernels $K --json $OUT/cs_kernels.json 2>&1 | tee $OUT/cs_kernels.log
        VPTQ_MLC_GPU_CODE_SORTED=$K python3 -m pytest -q -s tests/gpu/test_code_sorted_gpu.py -p no:cacheprovider 2>&1 \
          | tail -n 15 | tee $OUT/cs_pytest.log ;;
    pytest) VPTQ_MLC_GPU_KERNELS=.carry/kcheck VPTQ_MLC_GPU_E2E=.carry/issue10/e2e python3 -m pytest -q -s tests/gpu \
              -p no:cacheprovider 2>&1 | tail -n 15 | tee $OUT/pytest.log ;;
  esac
done
