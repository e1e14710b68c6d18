"""Calibration: the input Hessian `H = X^T X / n` of every quantized linear, from real text.

The dense model runs (transformers, float32) over `n_tokens` tokens of calibration text cut into `seq_len`
windows; forward pre-hooks on q_proj (whose input k_proj and v_proj share), o_proj, gate_proj (shared with
up_proj) and down_proj accumulate `X^T X`; any other decoder linear (MLA projections, experts) gets its own hook,
and its Hessian is divided by the rows it saw (a routed expert sees only the tokens routed to it; one that saw none
gets no Hessian and plain k-means). Like VPTQ's published recipe, every Hessian comes from the
unquantized model in one pass. Only the decoder layers being quantized run (the rest of the stack is cut off).

Results are cached by model weights, text and settings, so quantizing several variants calibrates once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from vptq_mlc.errors import QuantizeError
from vptq_mlc.progress import progress_bar

log = logging.getLogger(__name__)

# leaf of the hooked module -> leaves that read the same input
SHARED_INPUTS = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _own_hook_paths(paths: list[str]) -> list[str]:
    """Decoder linears outside the Llama layer's shared-input hooks: each gets a hook of its own."""
    shared = {u for users in SHARED_INPUTS.values() for u in users}
    return [p for p in paths if p.split(".", 3)[3] not in shared]


def calibration_windows(tokenizer_file: Path, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """`[n, seq_len]` int64 token windows from the start of `text` (tokenized with the model's tokenizer.json)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    n = min(n_tokens, len(ids)) // seq_len
    if n < 1:
        raise QuantizeError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; give a longer --calib text"
        )
    if n * seq_len < n_tokens:
        log.warning("calibration text gives %d tokens, fewer than the %d asked for", n * seq_len, n_tokens)
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def _cache_key(model_dir: Path, text: str, n_tokens: int, seq_len: int, n_layers: int) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(hashlib.sha256(text.encode()).digest())
    h.update(f"{n_tokens}:{seq_len}:{n_layers}:v1".encode())
    return h.hexdigest()[:16]


def collect_hessians(
    model_dir: Path,
    text: str,
    n_layers: int,
    *,
    n_tokens: int = 8192,
    seq_len: int = 512,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Module path (e.g. `model.layers.0.mlp.up_proj`) -> `H [I, I]` float32 for the first `n_layers` layers."""
    from vptq_mlc.checkpoint.arch import decoder_linears

    config = json.loads((model_dir / "config.json").read_text())
    own = _own_hook_paths(list(decoder_linears({**config, "num_hidden_layers": n_layers})))
    key = _cache_key(model_dir, text, n_tokens, seq_len, n_layers)
    cached = cache_dir / f"hessians-{key}.safetensors" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        from safetensors.torch import load_file

        log.info("using cached calibration Hessians %s", cached)
        stored = load_file(str(cached))
        return _expand(stored, n_layers)

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise QuantizeError("calibration needs transformers: pip install 'vptq-mlc[quantize]'") from None
    windows = calibration_windows(model_dir / "tokenizer.json", text, n_tokens, seq_len)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    body = model.model
    body.layers = body.layers[:n_layers]  # nothing after the last quantized layer matters
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}  # rows each own-hooked linear saw
    count = 0
    hooks = []

    def hook_for(name: str):
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            rows[name] = rows.get(name, 0) + x.shape[0]
            acc = sums.get(name)
            if acc is None:
                sums[name] = x.t() @ x
            else:
                acc.addmm_(x.t(), x)

        return pre_hook

    for i in range(n_layers):
        layer = body.layers[i]
        for leaf in SHARED_INPUTS:
            try:
                mod = layer.get_submodule(leaf)
            except AttributeError:  # not a Llama-layer model: its linears have hooks of their own
                continue
            hooks.append(mod.register_forward_pre_hook(hook_for(f"model.layers.{i}.{leaf}")))
    for path in own:
        hooks.append(model.get_submodule(path).register_forward_pre_hook(hook_for(path)))
    try:
        with torch.no_grad():
            for w in progress_bar(windows, desc="calibrate", unit="window", disable=not progress):
                body(input_ids=w[None], use_cache=False)
                count += w.numel()
    finally:
        for h in hooks:
            h.remove()
    own_set = set(own)
    stored = {k: (v / (rows[k] if k in own_set else count)).contiguous() for k, v in sums.items()}
    if cached is not None:
        from safetensors.torch import save_file

        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        os.close(fd)
        save_file(stored, tmp, metadata={"tokens": str(count), "info": json.dumps({"seq_len": seq_len})})
        os.replace(tmp, cached)
    return _expand(stored, n_layers)


def _expand(stored: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Shared-input Hessians handed to every linear reading that input; own-hooked ones pass through."""
    out: dict[str, torch.Tensor] = dict(stored)
    for i in range(n_layers):
        for leaf, users in SHARED_INPUTS.items():
            H = stored.get(f"model.layers.{i}.{leaf}")
            if H is not None:
                for u in users:
                    out[f"model.layers.{i}.{u}"] = H
    return out
