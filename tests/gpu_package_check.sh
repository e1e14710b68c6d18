#!/usr/bin/env bash
# Issue 9 check on a GPU host (run by hand, e.g. on the device machine): the packaged CUDA library chats with
# runtime-only TVM from a runtime bundle, with no nvcc on PATH and no NVRTC loaded, and agrees with the CPU library.
# Prepare C (default .carry/issue9) on the build box: `vptq-mlc runtime-bundle $C/bundle312 --python 3.12`,
# wheels of jinja2/markupsafe/click/tqdm in $C/whl, and `vptq-mlc package` of a model with targets
# ["llvm", "cuda:sm_80,sm_90"] into $C/dist/tiny. Writes logs to $OUT.
cd "$(dirname "$0")/.."
C=${C:-.carry/issue9}
OUT=${OUT:-/tmp/gpu_package_check}; mkdir -p "$OUT"
python3 -c "import jinja2, click, tqdm, tokenizers, numpy" 2>/dev/null || {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl && export PYTHONPATH=/tmp/site; }
export PYTHONPATH=$PWD/$C/bundle312:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -i cuda | paste -sd:)
echo "nvcc on PATH: $(command -v nvcc || echo none)"
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
python3 --version
cat > /tmp/chat.py <<'PY'
import sys, atexit
sys.modules["torch"] = None  # the GPU image has torch; a deploy host would not (torch maps libnvrtc)
def report():
    import tvm
    libs = sorted({l.split()[-1].rsplit("/", 1)[-1] for l in open("/proc/self/maps").read().splitlines() if ".so" in l})
    print("REPORT runtime_only", tvm.base._RUNTIME_ONLY, "tvm from", tvm.__file__, file=sys.stderr)
    print("REPORT nvrtc", any("nvrtc" in l for l in libs), "compiler", any("tvm_compiler" in l for l in libs),
          "ptxjit", any("ptxjitcompiler" in l for l in libs), file=sys.stderr)
    print("REPORT libs", [l for l in libs if any(k in l for k in ("tvm", "cuda", "nvrtc", "ptx"))], file=sys.stderr)
atexit.register(report)
from vptq_mlc.cli import main
main()
PY
ARGS="--prompt hello --max-tokens 16 --temperature 0 --raw"
python3 /tmp/chat.py -v chat $C/dist/tiny $ARGS >$OUT/gpu.txt 2>$OUT/gpu.err; echo "gpu rc=$?"
python3 /tmp/chat.py -v chat $C/dist/tiny --device cpu $ARGS >$OUT/cpu.txt 2>$OUT/cpu.err; echo "cpu rc=$?"
echo "GPU reply: $(cat $OUT/gpu.txt | head -c 300)"; echo "CPU reply: $(cat $OUT/cpu.txt | head -c 300)"
cmp -s $OUT/gpu.txt $OUT/cpu.txt && echo "GPU == CPU reply" || echo "GPU != CPU reply"
grep -E "REPORT|package|select|device|INFO vptq_mlc.package" $OUT/gpu.err | head -12
cp -r $C/dist/tiny /tmp/bad && python3 -c "
p='/tmp/bad/tiny-vptq-v8-k256-0-cuda.so'; b=bytearray(open(p,'rb').read()); b[len(b)//2]^=255; open(p,'wb').write(b)"
python3 /tmp/chat.py chat /tmp/bad $ARGS >/dev/null 2>$OUT/bad.err; echo "corrupted rc=$?"; grep -v REPORT $OUT/bad.err | head -3
