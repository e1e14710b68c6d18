#!/usr/bin/env bash
# Layer split on a 2-GPU host: one GPU vs the layers split over cuda:0,cuda:1, for a tiny model (weights carried)
# and a llama2-7b-shaped one (config-only, random weights written on the host).
# Usage on the GPU host, from the repo root: bash bench/split_gpu.sh OUT_DIR ART_DIR [tiny] [7b] [405b]
# (default steps: tiny 7b). ART_DIR, carried from the build box, holds tvm_rt/ (vptq-mlc runtime-bundle
# ART_DIR/tvm_rt --python 3.12) and what each step reads:
#   tiny:  split/tiny (a converted tiny model) + split/tiny-split-cuda.so
#   7b:    split/vq7b (config-only 7B shape) + split/vq7b-split-cuda.so
#   405b:  split405/vq405b (config-only llama3.1-405b shape) + split405/vq405b-split-cuda.so; never a default: it
#          needs two 80 GB GPUs (109 GB of v8-k4096-0 weights, made on the GPUs: no shards, no disk)
# built with, e.g.:
#   vptq-mlc compile ART_DIR/split/tiny --target cuda --arch sm_90 --split-functions -o ART_DIR/split/tiny-split-cuda.so
#   vptq-mlc bench synth-model ART_DIR/split405/vq405b --shape llama3.1-405b --variant v8-k4096-0 --config-only
set -o pipefail
OUT=${1:?usage: split_gpu.sh OUT_DIR ART_DIR [steps...]}
ART=${2:?usage: split_gpu.sh OUT_DIR ART_DIR [steps...]}
shift 2
STEPS=${*:-"tiny 7b"}
ART=$(cd "$ART" && pwd)
export PYTHONPATH=$ART/tvm_rt:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/split_env.txt"
rc=0
for s in $STEPS; do
  case $s in
    tiny) python3 bench/split_gpu.py "$ART/split/tiny" "$ART/split/tiny-split-cuda.so" "$OUT" --name tiny \
            2>&1 | tee "$OUT/split_tiny.log" || rc=1 ;;
    7b) python3 bench/split_gpu.py "$ART/split/vq7b" "$ART/split/vq7b-split-cuda.so" "$OUT" --name vq7b \
          --random-weights 2>&1 | grep -v "random weights:" | tee "$OUT/split_vq7b.log" || rc=1 ;;
    405b) python3 bench/split_gpu.py "$ART/split405/vq405b" "$ART/split405/vq405b-split-cuda.so" "$OUT" \
            --name vq405b --random-weights-on-device --batch 4 2>&1 | tee "$OUT/split_vq405b.log" || rc=1 ;;
    *) echo "unknown step $s (tiny 7b 405b)" >&2; exit 2 ;;
  esac
done
exit $rc
