"""Perplexity on real text, from our compiled model library and from transformers on the same weights.

Both paths see the same token windows: the text is tokenized once with the model's tokenizer.json (no special
tokens added), the first `max_tokens` tokens are cut into non-overlapping windows of `ctx` tokens, and every
token of a window but the first is scored given the ones before it in that window. ppl = exp(mean NLL).

- compiled: the library's `batch_prefill` with `logit_positions = 0..n-1` returns the logits of every
  position of a prefill piece; the number of positions is bounded by the library's `max_batch_size`, so a
  window is fed in pieces of that many tokens through the runtime's paged KV cache (which carries the
  prefix); only tvm.runtime is used, as on a deploy host.
- reference: transformers' `AutoModelForCausalLM` (float32) holding the dense weights; for a VPTQ checkpoint
  every quantized linear is rebuilt with `checkpoint.dequant.dequantize` (the package's one dense-weight
  function), for a dense HF directory (e.g. the fp16 source model) the weights are used as stored.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vptq_mlc.artifact.files import CHAT_CONFIG
from vptq_mlc.errors import QuantizeError
from vptq_mlc.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class PplResult:
    ppl: float
    nll: float  # mean negative log-likelihood (nats/token)
    tokens: int  # tokens scored
    windows: int
    ctx: int
    seconds: float
    source: str

    def line(self) -> str:
        return (f"ppl {self.ppl:.4f}  (nll {self.nll:.5f} over {self.tokens} tokens, {self.windows} windows of "
                f"{self.ctx}, {self.seconds:.1f} s)  [{self.source}]")


def token_windows(tokenizer_json: Path, text: str, ctx: int, max_tokens: int | None) -> list[list[int]]:
    """Non-overlapping windows of `ctx` token ids from the start of `text` (the last one may be shorter)."""
    from tokenizers import Tokenizer

    if ctx < 2:
        raise QuantizeError(f"--ctx {ctx} is too small; use at least 2 tokens")
    if not tokenizer_json.is_file():
        raise QuantizeError(f"{tokenizer_json} does not exist; the model directory needs its tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
        raise QuantizeError(f"{tokenizer_json} is not a valid tokenizer ({str(e).splitlines()[0]}); copy the model's "
                            "tokenizer.json again") from None
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    wins = [ids[i : i + ctx] for i in range(0, len(ids), ctx)]
    wins = [w for w in wins if len(w) >= 2]
    if not wins:
        raise QuantizeError("the evaluation text has fewer than 2 tokens; give a longer --text")
    return wins


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Sum of -log p(ids[t+1] | ids[:t+1]) from `logits [n, vocab]` (row t predicts token t+1), in float64."""
    z = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    tgt = np.asarray(ids[1:], dtype=np.int64)
    return float((logz - z[np.arange(len(tgt)), tgt]).sum())


def _score(windows: list[list[int]], logits_of: Callable[[list[list[int]]], list[np.ndarray]], source: str,
           batch: int, progress: bool) -> PplResult:
    """Mean NLL over `windows`, fetching logits `batch` equal-length windows at a time."""
    t0 = time.time()
    total, count = 0.0, 0
    groups: list[list[list[int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch and len(groups[-1][0]) == len(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    with progress_bar(total=len(windows), desc=f"ppl {source}", unit="window", disable=not progress) as bar:
        for g in groups:
            for w, logits in zip(g, logits_of(g)):
                total += window_nll(logits, w)
                count += len(w) - 1
            bar.update(len(g))
    nll = total / count
    ctx = max(len(w) for w in windows)
    return PplResult(math.exp(nll), nll, count, len(windows), ctx, time.time() - t0, source)


# ---- compiled library --------------------------------------------------------------------------------------


def ppl_compiled(model_dir: str | Path, lib: str | Path | None, windows: list[list[int]], device: Any = "cpu",
                 progress: bool = True) -> PplResult:
    """Perplexity from our compiled library (all-position logits through `batch_prefill`); `device` as `Engine`
    takes it (the CLI's Placement, a DeviceSpec or a device string)."""
    import tvm
    from tvm.runtime import ShapeTuple

    from vptq_mlc.runtime.engine import Engine

    ctx = max(len(w) for w in windows)
    engine = Engine(model_dir, lib, device=device, max_batch_size=1, context_window=None)
    if engine.lib.metadata.get("kv_cache", {}).get("attn_kind") == "mla":
        raise QuantizeError(f"{engine.lib.path.name} runs on the MLA KV cache, whose batch_prefill takes one logit "
                            "position per sequence, not every position perplexity needs; compile the model with "
                            "--kv-cache mha to measure it")
    if ctx > engine.context_window:
        raise QuantizeError(f"--ctx {ctx} exceeds the library's context window {engine.context_window}; lower --ctx")
    embed, prefill = engine.lib.func("embed"), engine.lib.func("batch_prefill")
    reshape = tvm.get_global_func("vm.builtin.reshape")
    dev = engine.lib.device
    seq_ids = iter(range(1 << 30))
    # `logit_positions` is bounded by the library's max_batch_size (its memory plan), so a window goes in
    # pieces of at most that many tokens, each asking for all of its positions; the KV cache carries the prefix.
    bound = int(engine.lib.metadata.get("max_batch_size", -1))
    piece = min(engine.prefill_chunk, bound) if bound > 0 else engine.prefill_chunk

    def one(ids: list[int]) -> np.ndarray:
        seq = next(seq_ids)
        engine.kv.add(seq)
        out = []
        try:
            for s in range(0, len(ids), piece):
                chunk = ids[s : s + piece]
                n = len(chunk)
                emb = embed(tvm.runtime.tensor(np.asarray(chunk, np.int32), dev), engine.params)
                emb = reshape(emb, ShapeTuple([1, n, int(emb.shape[-1])]))
                pos = tvm.runtime.tensor(np.arange(n, dtype=np.int32), dev)
                with engine.kv.forward([seq], [n]) as kv:
                    res = prefill(emb, pos, kv, engine.params)
                out.append(res[0].numpy()[0])
        finally:
            engine.kv.remove(seq)
        return np.concatenate(out)

    name = Path(engine.lib.path).name
    return _score(windows, lambda ws: [one(w) for w in ws], f"compiled {name}", 1, progress)


# ---- transformers reference --------------------------------------------------------------------------------


def _is_vptq(path: Path) -> bool:
    from vptq_mlc.checkpoint.detect import is_vptq_dir

    return is_vptq_dir(path)


def load_reference_model(path: str | Path) -> Any:
    """A float32 transformers causal LM with the dense weights of `path` (VPTQ checkpoint or dense HF dir)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise QuantizeError(
            "the reference perplexity needs torch and transformers: pip install 'vptq-mlc[quantize]'"
        ) from None
    p = Path(path)
    if not (p / "config.json").is_file():
        raise QuantizeError(f"{p} has no config.json; give a VPTQ checkpoint or a Hugging Face model directory")
    if not _is_vptq(p):
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()

    from vptq_mlc.checkpoint.dequant import dequantize
    from vptq_mlc.checkpoint.reader import VPTQCheckpoint

    ck = VPTQCheckpoint.open(p)
    cfg = {k: v for k, v in ck.hf_config.items()
           if k not in ("quantization_config", "quant_config", "vptq_mlc_quantize", "torch_dtype", "dtype")}
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state: dict[str, Any] = {n: torch.from_numpy(np.asarray(ck.get(n), np.float32)) for n in ck.dense_tensor_names()}
    for path_, lc in tqdm(ck.layers.items(), desc="dequantize", unit="layer", disable=True):
        t = ck.layer_tensors(path_)
        state[f"{path_}.weight"] = torch.from_numpy(dequantize(lc, t, path_).astype(np.float32))
        if lc.bias:
            state[f"{path_}.bias"] = torch.from_numpy(np.asarray(t["bias"], np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QuantizeError(f"checkpoint {p} does not fit {config.model_type}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def ppl_reference(path: str | Path, windows: list[list[int]], progress: bool = True, batch: int = 8) -> PplResult:
    """Perplexity from transformers on the dense (dequantized) weights of `path`."""
    import torch

    model = load_reference_model(path)

    def logits_of(ws: list[list[int]]) -> list[np.ndarray]:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ws), use_cache=False).logits
        return list(out.float().numpy())

    return _score(windows, logits_of, f"transformers {Path(path).name}", batch, progress)


def text_windows_for(model_dir: Path, text_spec: str | None, ctx: int, max_tokens: int | None) -> list[list[int]]:
    """Windows of the eval text (default: Hamlet from the corpus) with `model_dir`'s tokenizer."""
    from vptq_mlc.data.corpus import EVAL_DEFAULT, load_text

    return token_windows(model_dir / "tokenizer.json", load_text(text_spec, default=EVAL_DEFAULT), ctx, max_tokens)


def is_mlc_dir(path: Path) -> bool:
    return (path / CHAT_CONFIG).is_file()


def describe(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
        q = cfg.get("vptq_mlc_quantize") or {}
        return str(q.get("variant") or ("vptq" if _is_vptq(path) else "dense"))
    except (OSError, json.JSONDecodeError):
        return "?"
