#!/usr/bin/env bash
# Package check on a GPU host (run by hand): the packaged CUDA library chats with runtime-only TVM from a runtime
# bundle, with no nvcc on PATH and no NVRTC loaded, and agrees with the CPU library.
# Usage: bash tests/gpu_package_check.sh ART_DIR [OUT_DIR]. Prepare ART_DIR on the build box:
# `vptq-mlc runtime-bundle ART_DIR/bundle312 --python 3.12`, wheels of jinja2/markupsafe/click/tqdm in ART_DIR/whl,
# and `vptq-mlc package` of a model with targets ["llvm", "cuda:sm_80,sm_90"] into ART_DIR/dist/tiny.
C=$(cd "${1:?usage: gpu_package_check.sh ART_DIR [OUT_DIR]}" && pwd)
OUT=${2:-/tmp/gpu_package_check}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python3 -c "import jinja2, click, tqdm, tokenizers, numpy" 2>/dev/null || {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $C/whl/*.whl && export PYTHONPATH=/tmp/site; }
export PYTHONPATH=$C/bundle312:$PWD${PYTHONPATH:+:$PYTHONPATH}
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
