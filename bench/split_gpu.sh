#!/usr/bin/env bash
# Layer split (issue 11 item 2) on a 2-GPU host: one GPU vs the layers split over cuda:0,cuda:1, for a tiny model
# (weights carried) and a llama2-7b-shaped one (config-only, random weights written on the host).
# Usage on the GPU host, from the repo root: bash bench/split_gpu.sh OUT_DIR [tiny] [7b] [405b]   (default: tiny 7b)
# Needs .carry/tvm_rt (vptq-mlc runtime-bundle .carry/tvm_rt --python 3.12) and .carry/split, built on the build box:
#   mkdir -p .carry/split && cp -r .carry/issue10/e2e/model .carry/split/tiny && cp -r .carry/e2e7b/vq-cfg .carry/split/vq7b
#   vptq-mlc compile .carry/split/tiny --target cuda --arch sm_90 --split-functions -o .carry/split/tiny-split-cuda.so
#   vptq-mlc compile .carry/split/vq7b --target cuda --arch sm_90 --split-functions -o .carry/split/vq7b-split-cuda.so
# Step 405b (never a default: it needs two 80 GB GPUs) runs a llama3.1-405b-shaped v8-k4096-0 model (109 GB of
# weights: fits no single 80 GB GPU) split over cuda:0,cuda:1 with random weights made on the GPUs (no shards, no
# disk); it needs only .carry/tvm_rt and .carry/split405 (~17 MB), built on the build box:
#   vptq-mlc bench synth-model .carry/split405/vq405b --shape llama3.1-405b --variant v8-k4096-0 --config-only
#   vptq-mlc compile .carry/split405/vq405b --target cuda --arch sm_90 --split-functions -o .carry/split405/vq405b-split-cuda.so
set -o pipefail
OUT=${1:?out dir}; shift
STEPS=${*:-"tiny 7b"}
export PYTHONPATH=$PWD/.carry/tvm_rt:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/split_env.txt"
rc=0
for s in $STEPS; do
  case $s in
    tiny) python3 bench/split_gpu.py .carry/split/tiny .carry/split/tiny-split-cuda.so "$OUT" --name tiny \
            2>&1 | tee "$OUT/split_tiny.log" || rc=1 ;;
    7b) python3 bench/split_gpu.py .carry/split/vq7b .carry/split/vq7b-split-cuda.so "$OUT" --name vq7b \
          --random-weights 2>&1 | grep -v "random weights:" | tee "$OUT/split_vq7b.log" || rc=1 ;;
    405b) python3 bench/split_gpu.py .carry/split405/vq405b .carry/split405/vq405b-split-cuda.so "$OUT" --name vq405b \
            --random-weights-on-device --batch 4 2>&1 | tee "$OUT/split_vq405b.log" || rc=1 ;;
  esac
done
exit $rc
