"""The error types every stage raises; the CLI turns them into one-line messages and a non-zero exit."""

import os


class VPTQMLCError(Exception):
    """Base class: a problem the user can fix. `str(e)` is one line naming the problem and the fix."""


class CheckpointError(VPTQMLCError):
    """A VPTQ checkpoint is missing, malformed, truncated or uses something we do not support."""


class ConvertError(VPTQMLCError):
    """The MLC artifact directory cannot be written or read back."""


class CompileError(VPTQMLCError):
    """A model library cannot be built for the requested target."""


class RuntimeLoadError(VPTQMLCError):
    """A model library or its weights cannot be loaded on this host."""


class GenerationError(VPTQMLCError):
    """A generation request cannot run: a bad sampling parameter, a prompt longer than the context window, ..."""


class QuantizeError(VPTQMLCError):
    """A model cannot be imported or quantized, or calibration/evaluation text is missing or too short."""


class ModelDirError(ConvertError, RuntimeLoadError):
    """An MLC model directory lacks a file or has a malformed one. convert, compile and the runtime all read model
    dirs, so this is both a ConvertError and a RuntimeLoadError (either `except` clause catches it)."""


class HubError(VPTQMLCError):
    """A model named by Hugging Face Hub id cannot be found, fetched or read from the local hub cache."""


def compile_switch(env: str, default: bool, what: str) -> bool:
    """A compile-time on/off switch read from the environment variable `env` ("1" on, "0" off, unset: `default`);
    any other value is a one-line CompileError naming `what` the switch turns on."""
    value = os.environ.get(env, "")
    if value not in ("", "0", "1"):
        raise CompileError(f"{env}={value!r}: set it to 1 ({what}) or 0 (off)")
    return default if value == "" else value == "1"
