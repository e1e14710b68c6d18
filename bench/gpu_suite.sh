#!/usr/bin/env bash
# Everything the GPU host checks and times, in one device call, on artifacts built on the build box.
# Usage (GPU host, repo root): bash bench/gpu_suite.sh OUT_DIR ART_DIR [steps...]
# ART_DIR is the folder carried from the build box; each step reads its part (build commands in bench/RESULTS.md):
#   tvm_rt/   runtime-only TVM: vptq-mlc runtime-bundle ART_DIR/tvm_rt --python 3.12 (optional: a full TVM works)
#   kcheck/   vptq-mlc bench build ART_DIR/kcheck --suite check --arch sm_90          steps: check, pytest
#   kbench/   vptq-mlc bench build ART_DIR/kbench --suite kernels --arch sm_90 --rows 1,8    step: kernels
#   ksweep/   vptq-mlc bench build ART_DIR/ksweep --suite sweep --arch sm_90 (batch-1 GEMV launch shapes) step: sweep
#   kcs/      vptq-mlc bench build ART_DIR/kcs --suite code-sorted --arch sm_90      steps: cs, pytest
#   kwide/    vptq-mlc bench build ART_DIR/kwide --suite mma-wide --arch sm_90       step: kwide
#   kreg/     vptq-mlc bench build ART_DIR/kreg --suite register-tiles --arch sm_90  step: kreg
#   e2e/      a tiny converted model: model/, model-cpu.so, model-cuda.so, ckpt/ (its checkpoint, for the
#             transformers reference)                                                  steps: decode, pytest
#   e2eds/    a tiny fp16 deepseek_v3: model/, model-cpu.so.gz, model-cuda.so.gz (unpacked here), reference.npz
#             (transformers' tokens and logits, computed on the build box)             step: pytest
#   e2emla/   tiny/ and r1widths/: deepseek_v3 on the MLA cache and the MHA control (gpu_artifacts.sh ART e2emla)
#                                                                                      step: pytest
#   kgather/  the gathered-experts kernel at DeepSeek-R1 shapes (bash bench/gpu_artifacts.sh ART kgather)  step: pytest
#   e2e7b/    per system NAME: NAME-cfg/ (vptq-mlc bench synth-model ... --config-only) and NAME-cuda.so
#                                                                            steps: e2e7b, profile7b
#   attn/     python3 bench/attention_prefill.py build ART_DIR/attn --arch sm_90        steps: attn, pytest
#   dattn/    python3 bench/attention_decode.py build ART_DIR/dattn --arch sm_90 (ours vs TVM's decode kernel)
#                                                                                      steps: dattn, pytest
#   sampler/  the compiled sampler alone (bash bench/gpu_artifacts.sh ART sampler)      steps: sampler, pytest
#   kprefill/ python3 bench/prefill_gemm.py build ART_DIR/kprefill --arch sm_90 (dequantize bandwidth, dense GEMM
#             plans vs cuBLAS)                                                         step: kprefill
#   kfold/    python3 bench/prefill_gemm.py build ART_DIR/kfold --only fold (the folding dequantize's launch shapes)
#                                                                                      step: kfold
#   kwgmma/   python3 bench/wgmma_gemm.py build ART_DIR/kwgmma (the wgmma GEMM, sm_90a, vs cuBLAS and the mma.sync
#             plan; one process per launch plan)                                       step: kwgmma
#   wheels/   the server's py3.12 wheels (fastapi, uvicorn, httpx, pydantic + deps, xgrammar 0.2.8), installed with
#             --no-index --no-deps into /tmp/sp for step api7b (WHEELS=DIR: elsewhere; default ART/wheels, else the
#             wheels/ folder next to ART)                                              step: api7b (also needs e2e7b/)
# step serve7b: bench/serve_load.py on the e2e7b system API7B_SYSTEM (a 1,800-token prompt among 15 model-sampling
# streams; 1 and 16 streams vs the in-process engine); needs wheels/ as api7b.
# step prefix: bench/prefix_ttft.py on the e2e7b system PREFIX_SYSTEM (default v8-k4096-0), PREFIX_ARGS: more arguments
# step sampler: vptq-mlc bench sampler on sampler/'s two builds (default, then the multi-block top-p search) at a
# 128256-token vocabulary, T 0.6 / top_p 0.9 and greedy.
# step sampling7b: bench/sampling_vs_greedy.py on each SAMPLING7B_SYSTEMS (default: E2E7B_SYSTEMS, else
# v8-k65536-256): model-default sampling vs greedy on one engine, batches 1 and 16, the sampler's kernels profiled.
# steps: check kernels sweep cs kwide kreg decode pytest e2e7b profile7b api7b attn dattn kprefill kfold kwgmma prefix serve7b
# sampler sampling7b (default: check kernels decode pytest)
# E2E7B_SYSTEMS: the e2e7b system names (default: "v8-k4096-0 v8-k65536-256 fp16"); E2E7B_STEPS: decode steps (64);
# E2E7B_ARGS: more `vptq-mlc bench e2e` arguments (e.g. "--batches 1,16 --sampling model").
# PROFILE7B_SYSTEMS: the systems bench/profile_decode.py profiles (default: E2E7B_SYSTEMS, else v8-k4096-0): kernel
# time and launches per decode step, step wall time; PROFILE7B_ARGS: more of its arguments (e.g. "--batch 16").
# API7B_SYSTEM: the e2e7b system `vptq-mlc bench api` serves (default v8-k4096-0); API7B_ARGS: more of its arguments
# (server vs engine is measured greedy and with the model's default sampling; --no-default-sampling: greedy only).
# Build ART_DIR on the build box with one command: bash bench/gpu_artifacts.sh ART_DIR tvm_rt kcheck e2e e2e7b
set -o pipefail
OUT=${1:?usage: gpu_suite.sh OUT_DIR ART_DIR [steps...]}
ART=${2:?usage: gpu_suite.sh OUT_DIR ART_DIR [steps...]}
shift 2
STEPS=${*:-"check kernels decode pytest"}
ART=$(cd "$ART" && pwd)
mkdir -p "$OUT"
export PYTHONPATH=${ART}/tvm_rt:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -d "$ART/tvm_rt" ] && export TVM_USE_RUNTIME_LIB=1
V=(python3 -c 'from vptq_mlc.cli import main; main()')
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import tvm, torch; print('tvm runtime-only:', tvm.base._RUNTIME_ONLY, '| torch', torch.__version__)" \
  | tee -a "$OUT/env.txt"
install_wheels() {  # the server's wheels into /tmp/sp (the GPU image has no package index)
  local W=${WHEELS:-$ART/wheels}; [ -d "$W" ] || W=$ART/../wheels
  if python3 -m pip --version > /dev/null 2>&1; then  # without pip a wheel is a zip of what it installs
    python3 -m pip install -q --no-index --no-deps --target /tmp/sp "$W"/*.whl
  else for w in "$W"/*.whl; do python3 -m zipfile -e "$w" /tmp/sp || return 1; done; fi
}
rc=0
for s in $STEPS; do
  case $s in
    check) "${V[@]}" bench check "$ART/kcheck" --json "$OUT/check.json" > "$OUT/check_full.log" 2>&1 || rc=1
      tail -n 8 "$OUT/check_full.log" | tee "$OUT/check.log" ;;  # the whole output stays: a crash names its case
    kernels) "${V[@]}" bench kernels "$ART/kbench" --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" || rc=1 ;;
    sweep) "${V[@]}" bench kernels "$ART/ksweep" --json "$OUT/gemv_sweep.json" 2>&1 | tee "$OUT/gemv_sweep.log" || rc=1 ;;
    cs) "${V[@]}" bench kernels "$ART/kcs" --json "$OUT/cs_kernels.json" 2>&1 | tee "$OUT/cs_kernels.log" || rc=1 ;;
    kwide) "${V[@]}" bench kernels "$ART/kwide" --json "$OUT/mma_wide_kernels.json" 2>&1 \
        | tee "$OUT/mma_wide_kernels.log" || rc=1 ;;
    kreg) "${V[@]}" bench kernels "$ART/kreg" --json "$OUT/register_tiles_kernels.json" 2>&1 \
        | tee "$OUT/register_tiles_kernels.log" || rc=1 ;;
    decode) E=$ART/e2e
      "${V[@]}" bench decode "$E/model" --lib "$E/model-cuda.so" --device cuda --tokens 32 \
        --compare-lib "$E/model-cpu.so" --compare-device cpu 2>&1 | tee "$OUT/decode.log" || rc=1 ;;
    pytest)
      for z in "$ART"/e2eds/*.so.gz "$ART"/e2emla/*/*.so.gz; do [ -f "$z" ] && { [ -f "${z%.gz}" ] || gunzip -c "$z" > "${z%.gz}"; }; done
      # only the folders that were built: a variable naming a missing folder fails its tests
      VPTQ_MLC_GPU_KERNELS=$([ -d "$ART/kcheck" ] && echo "$ART/kcheck") VPTQ_MLC_GPU_E2E=$([ -d "$ART/e2e" ] && echo "$ART/e2e") \
      VPTQ_MLC_GPU_CODE_SORTED=$([ -d "$ART/kcs" ] && echo "$ART/kcs") \
      VPTQ_MLC_GPU_DEEPSEEK=$([ -d "$ART/e2eds" ] && echo "$ART/e2eds") \
      VPTQ_MLC_GPU_DEEPSEEK_MLA=$([ -d "$ART/e2emla" ] && echo "$ART/e2emla") \
      VPTQ_MLC_GPU_ATTN=$([ -d "$ART/attn" ] && echo "$ART/attn") \
      VPTQ_MLC_GPU_DATTN=$([ -d "$ART/dattn" ] && echo "$ART/dattn") \
      VPTQ_MLC_GPU_GATHER=$([ -d "$ART/kgather" ] && echo "$ART/kgather") \
      VPTQ_MLC_GPU_SAMPLER_ALONE=$(ls "$ART/sampler/sampler-search-cuda.so" 2> /dev/null) \
        python3 -m pytest -q -s -ra tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -n 20 || rc=1 ;;
    e2e7b) for c in "$ART"/e2e7b/*-cfg; do  # gpu_artifacts.sh keeps one gzipped copy of the shared tokenizer
        [ -f "$c/tokenizer.json" ] || gunzip -c "$ART/e2e7b/tokenizer/tokenizer.json.gz" > "$c/tokenizer.json"; done
      SYS=()
      for n in ${E2E7B_SYSTEMS:-v8-k4096-0 v8-k65536-256 fp16}; do SYS+=(--system "$n" "$ART/e2e7b/$n-cfg" "$ART/e2e7b/$n-cuda.so"); done
      "${V[@]}" bench e2e "$OUT/e2e_7b.json" --steps "${E2E7B_STEPS:-64}" --no-transformers "${SYS[@]}" --device cuda \
        ${E2E7B_ARGS:-} \
        > "$OUT/e2e_7b.log" 2>&1 || rc=1
      tail -n 18 "$OUT/e2e_7b.log" ;;
    profile7b) for c in "$ART"/e2e7b/*-cfg; do
        [ -f "$c/tokenizer.json" ] || gunzip -c "$ART/e2e7b/tokenizer/tokenizer.json.gz" > "$c/tokenizer.json"; done
      for n in ${PROFILE7B_SYSTEMS:-${E2E7B_SYSTEMS:-v8-k4096-0}}; do  # kernels and launches per decode step
        python3 bench/profile_decode.py "$ART/e2e7b/$n-cfg" "$ART/e2e7b/$n-cuda.so" "$OUT/profile_7b_$n.json" \
          ${PROFILE7B_ARGS:-} > "$OUT/profile_7b_$n.log" 2>&1 || rc=1
        head -n 12 "$OUT/profile_7b_$n.log"; done ;;
    sampler) for n in sampler sampler-search; do
        "${V[@]}" bench sampler --lib "$ART/sampler/$n-cuda.so" --device cuda:0 --vocab 128256 --batch 1,16 \
          --temperature 0.6 --top-p 0.9 --repeats 50 --json "$OUT/$n.json" > "$OUT/$n.log" 2>&1 || rc=1
        tail -n 8 "$OUT/$n.log"; done ;;
    sampling7b) for c in "$ART"/e2e7b/*-cfg; do
        [ -f "$c/tokenizer.json" ] || gunzip -c "$ART/e2e7b/tokenizer/tokenizer.json.gz" > "$c/tokenizer.json"; done
      for n in ${SAMPLING7B_SYSTEMS:-${E2E7B_SYSTEMS:-v8-k65536-256}}; do
        python3 bench/sampling_vs_greedy.py "$ART/e2e7b/$n-cfg" "$ART/e2e7b/$n-cuda.so" \
          "$OUT/sampling_vs_greedy_$n.json" --batches 1,16 --rounds 3 --profile > "$OUT/sampling_vs_greedy_$n.log" 2>&1 \
          || rc=1
        tail -n 8 "$OUT/sampling_vs_greedy_$n.log"; done ;;
    api7b) N=${API7B_SYSTEM:-v8-k4096-0}; C=$ART/e2e7b/$N-cfg
      [ -f "$C/tokenizer.json" ] || gunzip -c "$ART/e2e7b/tokenizer/tokenizer.json.gz" > "$C/tokenizer.json"
      if install_wheels > "$OUT/api_7b.log" 2>&1; then
        PYTHONPATH=$PYTHONPATH:/tmp/sp "${V[@]}" -v bench api "$C" --lib "$ART/e2e7b/$N-cuda.so" --device cuda \
          --json "$OUT/api_7b.json" ${API7B_ARGS:-} >> "$OUT/api_7b.log" 2>&1 || rc=1
      else rc=1; fi
      tail -n 12 "$OUT/api_7b.log" ;;
    serve7b) N=${API7B_SYSTEM:-v8-k4096-0}; C=$ART/e2e7b/$N-cfg; L=$ART/e2e7b/$N-cuda.so
      [ -f "$C/tokenizer.json" ] || gunzip -c "$ART/e2e7b/tokenizer/tokenizer.json.gz" > "$C/tokenizer.json"
      if install_wheels > "$OUT/serve_7b.log" 2>&1; then
        # 15 streams at the model's sampling, then a 1,800-token prompt arrives (context window 2,048; the prompt
        # needs a slot of its own and the library's batch is 16)
        PYTHONPATH=$PYTHONPATH:/tmp/sp python3 bench/serve_load.py --model "$C" --lib "$L" --device cuda \
          --clients 15 --max-batch-size 16 --max-tokens 256 --long-prompt-tokens 1800 --long-prompt-after 1.0 \
          --sampling model --json "$OUT/serve_7b_long_prompt.json" >> "$OUT/serve_7b.log" 2>&1 || rc=1
        # 1 and 16 streams at the model's sampling, the same requests through the in-process engine first
        PYTHONPATH=$PYTHONPATH:/tmp/sp python3 bench/serve_load.py --model "$C" --lib "$L" --device cuda \
          --clients 1,16 --max-batch-size 16 --requests 48 --max-tokens 128 --engine-baseline --sampling model \
          --json "$OUT/serve_7b_model_sampling.json" >> "$OUT/serve_7b.log" 2>&1 || rc=1
      else rc=1; fi
      grep -v "^INFO\|^starting" "$OUT/serve_7b.log" | tail -n 12 ;;
    attn) python3 bench/attention_prefill.py run "$ART/attn" --json "$OUT/attention_prefill.json" 2>&1 \
        | tee "$OUT/attention_prefill.log" || rc=1 ;;
    dattn) python3 bench/attention_decode.py run "$ART/dattn" --json "$OUT/attention_decode.json" 2>&1 \
        | tee "$OUT/attention_decode.log" || rc=1 ;;
    kprefill) python3 bench/prefill_gemm.py run "$ART/kprefill" --out "$OUT/prefill_gemm.json" 2>&1 \
        | tee "$OUT/prefill_gemm.log" || rc=1 ;;
    kfold) python3 bench/prefill_gemm.py run "$ART/kfold" --kinds fold --out "$OUT/fold_dequant.json" 2>&1 \
        | tee "$OUT/fold_dequant.log" || rc=1 ;;
    kwgmma) for plan in $(python3 -c "import json,sys; print(' '.join(sorted({f['plan'] for f in json.load(open(sys.argv[1]))['functions']} - {'mma_pipeline', 'wgmma_pipeline'})))" "$ART/kwgmma/manifest.json"); do
        timeout 60 python3 bench/wgmma_gemm.py run "$ART/kwgmma" --plans "$plan" --out "$OUT/wgmma_$plan.json" \
          > "$OUT/wgmma_$plan.log" 2>&1 || rc=1
        tail -n 12 "$OUT/wgmma_$plan.log"
      done ;;
    prefix) N=${PREFIX_SYSTEM:-v8-k4096-0}; C=$ART/e2e7b/$N-cfg
      [ -f "$C/tokenizer.json" ] || gunzip -c "$ART/e2e7b/tokenizer/tokenizer.json.gz" > "$C/tokenizer.json"
      python3 bench/prefix_ttft.py "$C" --lib "$ART/e2e7b/$N-cuda.so" --device cuda --json "$OUT/prefix_ttft.json" \
        ${PREFIX_ARGS:-} > "$OUT/prefix_ttft.log" 2>&1 || rc=1
      tail -n 12 "$OUT/prefix_ttft.log" ;;
    *) echo "unknown step $s (check kernels cs kwide kreg decode pytest e2e7b profile7b api7b attn dattn kprefill kfold" \
         "kwgmma prefix serve7b" \
         "sampler sampling7b)" >&2; exit 2 ;;
  esac
done
exit $rc
