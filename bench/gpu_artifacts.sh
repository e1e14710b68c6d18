#!/usr/bin/env bash
# Build, on the GPU-less build box, everything bench/gpu_suite.sh reads on the GPU host, into one folder to carry.
# Usage (repo root): bash bench/gpu_artifacts.sh ART_DIR [parts...]
# parts (default: tvm_rt kcheck e2e): tvm_rt kcheck kbench ksweep kcs kgather e2e e2eds e2emla e2e7b attn dattn kprefill kfold
# kwgmma kwide kreg sampler; each is skipped when already built.
#   kgather  the gathered-experts CUDA kernel at DeepSeek-R1 expert shapes (tests/gathered_kernels.py): gathered_cuda.so
#          + gathered.json, checked and timed by tests/gpu/test_gathered_gpu.py (a few seconds to build)
#   sampler  the compiled sampler alone (`vptq-mlc bench sampler --build`; any vocabulary, any rows): the one-block
#          search sampler/sampler-cuda.so and sampler/sampler-search-cuda.so with the multi-block top-p search (default)
#          (VPTQ_MLC_SAMPLER_TOP_P_SEARCH=1), timed by gpu_suite.sh's step sampler; tests/gpu checks the second
#   e2e    a tiny fp16 llama (hidden 256, 2 layers, v8-k256-256): ckpt/ (its checkpoint: the transformers reference of
#          tests/gpu), model/ (converted), model-cpu.so and model-cuda.so (sm_90, CUDA layout added by compile)
#   e2eds  a tiny fp16 deepseek_v3 (tests/deepseek_e2e.py): model/, model-cpu.so.gz (CPU_ARCH, default x86-64-v3:
#          any x86 GPU host), model-cuda.so.gz (gzipped: 11 MB -> 1.6 MB; gpu_suite.sh unpacks them) and reference.npz
#          (transformers' greedy tokens and teacher-forced logits, computed here: the GPU host has no transformers)
#   e2emla per shape in tiny r1widths (tests/deepseek_e2e.py SHAPES): SHAPE/model/, SHAPE/reference.npz and gzipped
#          SHAPE/model-mla.so (deepseek_v3 on TVM's latent MLA KV cache, --kv-cache mla) and
#          SHAPE/model-cuda.so (--kv-cache mha: the decompressed cache, as a control); tests/gpu/test_deepseek_mla_gpu.py
#   e2e7b  per name in E2E7B_SYSTEMS (default "v8-k4096-0 v8-k65536-256 fp16"): NAME-cfg/ (config-only synthetic
#          model, E2E7B_SHAPE, default llama2-7b; fp16 = the first variant's config with every linear dense) and
#          NAME-cuda.so. Tokenizers of the configs are the same file: one gzipped copy is kept in tokenizer/ and
#          gpu_suite.sh unpacks it into each config, so the 64 MiB a device call may carry is not spent on them.
#          E2E7B_COMPILE_ARGS: more `vptq-mlc compile` arguments (e.g. "--prefill-chunk 2048"). A name ending in
#          -fold / -nofold (e.g. v8-k4096-0-nofold) is that variant compiled with VPTQ_MLC_PREFILL_FOLD=1 / 0, one
#          ending in -wgmma / -mmasync (fp16-wgmma, v8-k4096-0-nofold-mmasync) with VPTQ_MLC_WGMMA=1 / 0; other names
#          get the defaults (folded prefill; sm_90 alone: wgmma; the whole-entry tensor-core decode kernel; the
#          split-KV decode attention). -mmawide / -mma (before a -wgmma / -mmasync: v8-k4096-0-mma,
#          v8-k4096-0-fold-mma-wgmma): VPTQ_MLC_MMA_WIDE=1 / 0. -dattn / -nodattn (last: v8-k4096-0-nodattn,
#          v8-k4096-0-nofold-mma-nodattn): VPTQ_MLC_DECODE_ATTN=1 / 0. -group (last of all):
#          VPTQ_MLC_PREFILL_GROUP=1 (q/k/v and gate/up as one folded prefill call each). -reg (after all of
#          them) / -noreg: VPTQ_MLC_REGISTER_TILES=1 / 0 (register-built A fragments and shared q/k/v, gate/up launches at
#          the tensor-core decode rows, on by default). -twomma / -notwomma (after -reg):
#          VPTQ_MLC_TWO_LAUNCH_MMA=1 / 0 (the two-launch form of the tensor-core decode linears, on by default).
#          -cta / -nocta (after -twomma): VPTQ_MLC_CTA_SPLITS=1 / 0 (register fragments over CTA splits for the
#          two-launch o_proj / down_proj, off by default). kcheck is built with VPTQ_MLC_FUSED_DECODE=1 and
#          VPTQ_MLC_CTA_SPLITS=1 (unless set), so the check suite runs those forms too.
#   dattn  the decode attention kernels alone (bench/attention_decode.py build): ours and TVM's at 32/32, 8/32 and
#          4/32 heads, read by gpu_suite.sh's steps dattn and pytest
#   kwide  the whole-entry tensor-core decode kernel next to the current one on the 7B shapes, rows 8 and 16
#          (`bench build --suite mma-wide`), timed by gpu_suite.sh's step kwide
#   kreg   the tensor-core decode kernel with register-built A fragments next to the registry's choice on the 7B shapes
#          at rows 1, 8 and 16, plus its plan variants at 16 rows (`bench build --suite register-tiles`, ~4 min),
#          timed by gpu_suite.sh's step kreg
#   kfold  the folding dequantize's launch shapes on the 7B shapes (`bench/prefill_gemm.py build --only fold`, ~40 s),
#          timed and checked by gpu_suite.sh's step kfold
# ARCH (default sm_90) sets the CUDA arch of every library.
set -euo pipefail
ART=${1:?usage: gpu_artifacts.sh ART_DIR [parts...]}
shift
PARTS=${*:-"tvm_rt kcheck e2e"}
ARCH=${ARCH:-sm_90}
mkdir -p "$ART"
ART=$(cd "$ART" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
V=(python3 -c 'from vptq_mlc.cli import main; main()')
built() { [ -e "$1" ] && echo "already built: $1 (delete it to rebuild)"; }

for p in $PARTS; do
  case $p in
    tvm_rt) built "$ART/tvm_rt" || "${V[@]}" runtime-bundle "$ART/tvm_rt" --python 3.12 ;;
    kcheck) built "$ART/kcheck" || VPTQ_MLC_FUSED_DECODE=1 VPTQ_MLC_CTA_SPLITS=${VPTQ_MLC_CTA_SPLITS:-1} \
      "${V[@]}" bench build "$ART/kcheck" --suite check --arch "$ARCH" ;;
    kbench) built "$ART/kbench" || "${V[@]}" bench build "$ART/kbench" --suite kernels --arch "$ARCH" --rows 1,8,16 ;;
    attn) built "$ART/attn" || python3 bench/attention_prefill.py build "$ART/attn" --arch "$ARCH" ;;
    dattn) built "$ART/dattn" || python3 bench/attention_decode.py build "$ART/dattn" --arch "$ARCH" ;;
    kprefill) built "$ART/kprefill" || python3 bench/prefill_gemm.py build "$ART/kprefill" --arch "$ARCH" ;;
    kfold) built "$ART/kfold" || python3 bench/prefill_gemm.py build "$ART/kfold" --arch "$ARCH" --only fold ;;
    kwgmma) built "$ART/kwgmma" || python3 bench/wgmma_gemm.py build "$ART/kwgmma" ;;  # always sm_90a
    kwide) built "$ART/kwide" || "${V[@]}" bench build "$ART/kwide" --suite mma-wide --arch "$ARCH" ;;
    kreg) built "$ART/kreg" || "${V[@]}" bench build "$ART/kreg" --suite register-tiles --arch "$ARCH" ;;
    ksweep) built "$ART/ksweep" || "${V[@]}" bench build "$ART/ksweep" --suite sweep --arch "$ARCH" ;;
    kcs) built "$ART/kcs" || "${V[@]}" bench build "$ART/kcs" --suite code-sorted --arch "$ARCH" ;;
    kgather) built "$ART/kgather" || python3 tests/gathered_kernels.py build "$ART/kgather" "$ARCH" ;;
    sampler) mkdir -p "$ART/sampler"
      built "$ART/sampler/sampler-cuda.so" || VPTQ_MLC_SAMPLER_TOP_P_SEARCH=0 "${V[@]}" bench sampler --build \
        "$ART/sampler/sampler-cuda.so" --device cuda --arch "$ARCH"
      built "$ART/sampler/sampler-search-cuda.so" || VPTQ_MLC_SAMPLER_TOP_P_SEARCH=1 "${V[@]}" bench sampler --build \
        "$ART/sampler/sampler-search-cuda.so" --device cuda --arch "$ARCH" ;;
    e2e) E=$ART/e2e
      if ! built "$E/model-cuda.so"; then
        python3 -c "
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint
make_synthetic_checkpoint('$E/ckpt', variant='v8-k256-256', hidden_size=256, intermediate_size=512, num_heads=4,
                          num_kv_heads=2, vocab_size=512, dtype='float16', seed=1, overwrite=True)"
        "${V[@]}" convert "$E/ckpt" -o "$E/model" --dtype float16
        "${V[@]}" compile "$E/model" --target llvm --arch "${CPU_ARCH:-x86-64-v3}" -o "$E/model-cpu.so"
        "${V[@]}" compile "$E/model" --target cuda --arch "$ARCH" -o "$E/model-cuda.so"
      fi ;;
    e2eds) E=$ART/e2eds
      if ! built "$E/model-cuda.so.gz"; then
        python3 tests/deepseek_e2e.py checkpoint "$E"
        "${V[@]}" convert "$E/ckpt" -o "$E/model" --dtype float16
        python3 tests/deepseek_e2e.py reference "$E"
        rm -rf "$E/ckpt"  # only the reference reads it (rebuilt from its seed by this part)
        "${V[@]}" compile "$E/model" --target llvm --arch "${CPU_ARCH:-x86-64-v3}" -o "$E/model-cpu.so"
        "${V[@]}" compile "$E/model" --target cuda --arch "$ARCH" --kv-cache mha -o "$E/model-cuda.so"
        gzip -9f "$E/model-cpu.so" "$E/model-cuda.so"
      fi ;;
    e2emla) for shape in tiny r1widths; do E=$ART/e2emla/$shape
        built "$E/model-mla.so.gz" && continue
        python3 tests/deepseek_e2e.py checkpoint "$E" "$shape"
        "${V[@]}" convert "$E/ckpt" -o "$E/model" --dtype float16 --overwrite
        python3 tests/deepseek_e2e.py reference "$E"
        rm -rf "$E/ckpt"
        "${V[@]}" compile "$E/model" --target cuda --arch "$ARCH" --kv-cache mha -o "$E/model-cuda.so"
        "${V[@]}" compile "$E/model" --target cuda --arch "$ARCH" --kv-cache mla -o "$E/model-mla.so"
        gzip -9f "$E/model-cuda.so" "$E/model-mla.so"
      done ;;
    e2e7b) D=$ART/e2e7b; mkdir -p "$D"
      set -- ${E2E7B_SYSTEMS:-v8-k4096-0 v8-k65536-256 fp16}
      first=$1
      for n in "$@"; do
        built "$D/$n-cuda.so" && continue
        # NAME-fold / NAME-nofold: VPTQ_MLC_PREFILL_FOLD=1 / 0; NAME-mmawide / NAME-mma: VPTQ_MLC_MMA_WIDE=1 / 0;
        # NAME-wgmma / NAME-mmasync: VPTQ_MLC_WGMMA=1 / 0; NAME-dattn / NAME-nodattn: VPTQ_MLC_DECODE_ATTN=1 / 0
        # NAME-group: VPTQ_MLC_PREFILL_GROUP=1; NAME-two: VPTQ_MLC_TWO_LAUNCH_DECODE=1 (unset otherwise: the
        # defaults); NAME-reg / NAME-noreg: VPTQ_MLC_REGISTER_TILES=1 / 0; they stack in this order
        # (NAME-nofold-mma-wgmma-nodattn-group-two-reg)
        nc=${n%-nocta}; cta=""; [ "$nc" != "$n" ] && cta=0
        [ "${nc%-cta}" != "$nc" ] && { nc=${nc%-cta}; cta=1; }
        nm=${nc%-notwomma}; tmma=""; [ "$nm" != "$nc" ] && tmma=0
        [ "${nm%-twomma}" != "$nm" ] && { nm=${nm%-twomma}; tmma=1; }
        nr=${nm%-reg}; reg=""; [ "$nr" != "$nm" ] && reg=1
        [ "${nr%-noreg}" != "$nr" ] && { nr=${nr%-noreg}; reg=0; }
        nt=${nr%-two}; two=""; [ "$nt" != "$nr" ] && two=1
        ng=${nt%-group}; group=""; [ "$ng" != "$nt" ] && group=1
        nd=${ng%-dattn}; dattn=""; [ "$nd" != "$ng" ] && dattn=1
        [ "${nd%-nodattn}" != "$nd" ] && { nd=${nd%-nodattn}; dattn=0; }
        base=${nd%-wgmma}; wgmma=""; [ "$base" != "$nd" ] && wgmma=1
        [ "${base%-mmasync}" != "$base" ] && { base=${base%-mmasync}; wgmma=0; }
        nowide=${base%-mmawide}; wide=""; [ "$nowide" != "$base" ] && wide=1
        [ "${nowide%-mma}" != "$nowide" ] && { nowide=${nowide%-mma}; wide=0; }
        variant=${nowide%-fold}; fold=""; [ "$variant" != "$nowide" ] && fold=1
        [ "${variant%-nofold}" != "$variant" ] && { variant=${variant%-nofold}; fold=0; }
        if [ "$variant" = fp16 ]; then
          built "$D/$first-cfg/mlc-chat-config.json" >/dev/null || { echo "fp16 needs a VQ system first" >&2; exit 2; }
          rm -rf "$D/$n-cfg"; cp -r "$D/$first-cfg" "$D/$n-cfg"
          python3 -c "
import json, pathlib
p = pathlib.Path('$D/$n-cfg/mlc-chat-config.json')
c = json.loads(p.read_text())
c['vptq']['layers'], c['quantization'] = {}, 'q0f16'  # every linear dense: our fp16 build of the same shape
p.write_text(json.dumps(c, indent=2))"
        else
          "${V[@]}" bench synth-model "$D/$n-cfg" --shape "${E2E7B_SHAPE:-llama2-7b}" --variant "$variant" --config-only
        fi
        VPTQ_MLC_CTA_SPLITS=${cta:-${VPTQ_MLC_CTA_SPLITS:-}} \
        VPTQ_MLC_TWO_LAUNCH_MMA=${tmma:-${VPTQ_MLC_TWO_LAUNCH_MMA:-}} \
        VPTQ_MLC_REGISTER_TILES=${reg:-${VPTQ_MLC_REGISTER_TILES:-}} \
        VPTQ_MLC_TWO_LAUNCH_DECODE=${two:-${VPTQ_MLC_TWO_LAUNCH_DECODE:-}} \
        VPTQ_MLC_PREFILL_GROUP=${group:-${VPTQ_MLC_PREFILL_GROUP:-}} \
        VPTQ_MLC_PREFILL_FOLD=${fold:-${VPTQ_MLC_PREFILL_FOLD:-}} VPTQ_MLC_WGMMA=${wgmma:-${VPTQ_MLC_WGMMA:-}} \
          VPTQ_MLC_DECODE_ATTN=${dattn:-${VPTQ_MLC_DECODE_ATTN:-}} VPTQ_MLC_MMA_WIDE=${wide:-${VPTQ_MLC_MMA_WIDE:-}} \
          "${V[@]}" compile "$D/$n-cfg" --target cuda --arch "$ARCH" -o "$D/$n-cuda.so" ${E2E7B_COMPILE_ARGS:-}
      done
      mkdir -p "$D/tokenizer"
      for c in "$D"/*-cfg; do
        [ -f "$c/tokenizer.json" ] || continue
        if [ -f "$D/tokenizer/tokenizer.json.gz" ] && ! gunzip -c "$D/tokenizer/tokenizer.json.gz" | cmp -s - "$c/tokenizer.json"
        then echo "$c has another tokenizer than $D/tokenizer: build one shape per ART_DIR" >&2; exit 2; fi
        gzip -c "$c/tokenizer.json" > "$D/tokenizer/tokenizer.json.gz"
        rm "$c/tokenizer.json"
      done ;;
    *) echo "unknown part $p (tvm_rt kcheck kbench ksweep kcs kgather e2e e2eds e2e7b attn dattn kprefill kfold kwgmma" \
         "kwide kreg sampler)" >&2; exit 2 ;;
  esac
done
du -sh "$ART"/* 2>/dev/null
