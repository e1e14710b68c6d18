"""Sampling on the device: the engine side of the library's `sample_tokens` (artifact/sampler_abi.py).

Per step the host uploads only small arrays (per-row parameters, sparse logit_bias and penalty-count lists,
constraint bitmask rows when a row has a constraint) and downloads each row's token, its logprob and the
requested top logprobs; the logits stay where the model wrote them. Each row's uniform comes from a
counter-based generator, `counter_uniform(seed, step)`, so a seeded request draws the same numbers alone or in
any batch. Libraries built before the sampler existed lack `sample_tokens`: the engine then samples on the host
(runtime/sampling.py, which is also the reference these kernels are tested against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm

from vptq_mlc.artifact import sampler_abi as abi
from vptq_mlc.runtime.sampling import SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def counter_uniform(seed: int, step: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, step): float32-exact (24 bits), so it never rounds to 1."""
    return (_splitmix64(_splitmix64(seed) ^ step) >> 40) / float(1 << 24)


@dataclass
class SampleRow:
    """What one logits row needs: the request's parameters and state at this step."""

    params: SamplingParams
    uniform: float = 0.0
    penalty_tokens: np.ndarray | None = None  # unique ids the penalties apply to (seen / generated)
    penalty_counts: np.ndarray | None = None  # how often each was generated (0: prompt only)
    bitmask: np.ndarray | None = None  # int32 [ceil(vocab / 32)] allowed tokens, or None
    skip: bool = False  # a row nobody reads (a prefill chunk that is not a prompt's last): cheapest settings


def pack_rows(rows: list[SampleRow], vocab_limit: int, mask_words: int) -> list[np.ndarray]:
    """The host-side arguments of `sample_tokens` after the logits, in order."""
    n = len(rows)
    fp = np.zeros((n, abi.F_COLS), dtype=np.float32)
    ip = np.zeros((n, abi.I_COLS), dtype=np.int32)
    bias_tok: list[np.ndarray] = []
    bias_val: list[np.ndarray] = []
    pen_tok: list[np.ndarray] = []
    pen_cnt: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    nb = npen = 0
    for i, row in enumerate(rows):
        p = row.params
        ip[i, abi.I_VOCAB_LIMIT] = vocab_limit
        ip[i, abi.I_MASK_ROW] = -1
        ip[i, abi.I_BIAS_START] = ip[i, abi.I_BIAS_END] = nb
        ip[i, abi.I_PENALTY_START] = ip[i, abi.I_PENALTY_END] = npen
        if row.skip:
            fp[i, abi.F_TOP_P] = fp[i, abi.F_REPETITION] = 1.0
            ip[i, abi.I_TOP_N] = -1
            continue
        fp[i, [abi.F_TEMPERATURE, abi.F_TOP_P, abi.F_MIN_P, abi.F_REPETITION, abi.F_PRESENCE, abi.F_FREQUENCY,
               abi.F_UNIFORM]] = [p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                                  p.frequency_penalty, row.uniform]
        ip[i, abi.I_TOP_K] = p.top_k
        ip[i, abi.I_TOP_N] = p.top_logprobs if p.logprobs else -1
        if p.logit_bias:
            ids = np.fromiter(p.logit_bias.keys(), dtype=np.int64, count=len(p.logit_bias))
            vals = np.fromiter(p.logit_bias.values(), dtype=np.float32, count=len(p.logit_bias))
            keep = ids < vocab_limit
            bias_tok.append(ids[keep].astype(np.int32))
            bias_val.append(vals[keep])
            nb += int(keep.sum())
            ip[i, abi.I_BIAS_END] = nb
        if row.penalty_tokens is not None and row.penalty_tokens.size:
            pen_tok.append(row.penalty_tokens.astype(np.int32, copy=False))
            pen_cnt.append(row.penalty_counts.astype(np.int32, copy=False))
            npen += row.penalty_tokens.size
            ip[i, abi.I_PENALTY_END] = npen
        if row.bitmask is not None:
            ip[i, abi.I_MASK_ROW] = len(masks)
            mask = np.full(mask_words, -1, dtype=np.int32)  # a shorter constraint vocabulary allows the rest
            mask[: min(mask_words, row.bitmask.size)] = row.bitmask[:mask_words]
            masks.append(mask)

    def cat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(1, dtype=dtype)

    bitmask = np.stack(masks) if masks else np.zeros((1, mask_words), dtype=np.int32)
    return [fp, ip, cat(bias_tok, "int32"), cat(bias_val, "float32"), cat(pen_tok, "int32"),
            cat(pen_cnt, "int32"), bitmask]


class DeviceSampler:
    """Calls the library's `sample_tokens` on logits already on the device."""

    def __init__(self, func: Any, device: tvm.runtime.Device) -> None:
        self.func = func
        self.device = device

    def sample(self, logits: Any, rows: list[SampleRow], vocab_limit: int | None = None
               ) -> list[tuple[int, TokenLogprob | None]]:
        """`logits`: a [len(rows), vocab] float32 device tensor. Returns (token, logprob or None) per row."""
        vocab = int(logits.shape[-1])
        limit = min(vocab_limit or vocab, vocab)
        host = pack_rows(rows, limit, (vocab + 31) // 32)
        args = [tvm.runtime.tensor(a, self.device) for a in host]
        out_tok, out_lp = self.func(logits, *args)
        top = max((r.params.top_logprobs for r in rows if r.params.logprobs and not r.skip), default=0)
        tokens = out_tok.numpy()[:, : top + 1]
        logprobs = out_lp.numpy()[:, : top + 1] if any(r.params.logprobs for r in rows) else None
        result: list[tuple[int, TokenLogprob | None]] = []
        for i, row in enumerate(rows):
            token = int(tokens[i, 0])
            if logprobs is None or not row.params.logprobs or row.skip:
                result.append((token, None))
                continue
            n = row.params.top_logprobs
            alternatives = [(int(t), float(lp)) for t, lp in zip(tokens[i, 1 : n + 1], logprobs[i, 1 : n + 1])]
            result.append((token, TokenLogprob(token, float(logprobs[i, 0]), alternatives)))
        return result
