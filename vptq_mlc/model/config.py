"""`DecoderConfig` for the model tree; it is defined with the architecture registry (checkpoint/arch.py), which
parses it from HF config.json without tvm so that `convert` also runs on runtime-only hosts."""

from vptq_mlc.checkpoint.arch import DecoderConfig

__all__ = ["DecoderConfig"]
