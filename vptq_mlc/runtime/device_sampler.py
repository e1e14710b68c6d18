"""Sampling on the device: the engine side of the library's `sample_tokens` (artifact/sampler_abi.py).

Per step the host uploads only small arrays (per-row parameters, sparse logit_bias and penalty-count lists,
constraint bitmask rows when a row has a constraint) and downloads each row's token, its logprob and the
requested top logprobs; the logits stay where the model wrote them. Each row's uniform comes from a
counter-based generator, `counter_uniform(seed, step)`, so a seeded request draws the same numbers alone or in
any batch. Libraries built before the sampler existed lack `sample_tokens`: the engine then samples on the host
(runtime/sampling.py, which is also the reference these kernels are tested against).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm.runtime import _ffi_api  # Tensor.numpy / copyfrom's copies, called on kept arrays

from vptq_mlc.artifact import sampler_abi as abi
from vptq_mlc.runtime.async_copy import HostLink, element_view
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
    """The host-side arguments of `sample_tokens` after the logits, in order. A greedy row's uniform is never read
    (the kernels draw only at temperature > 0): it is packed as 0, so a greedy batch's arguments stay the same."""
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
                                  p.frequency_penalty, row.uniform if p.temperature > 0 else 0.0]
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


class RowPacker:
    """`pack_rows`' arrays, built in place across steps: the same values, less host work per step.

    A row's parameter columns (temperature ... frequency, top_k, top_n) and its logit_bias entries are rewritten
    only when the row's `SamplingParams` object (or skip flag, or the vocabulary limit) differs from the one packed
    into that row last time; a SamplingParams is validated once and never changed after (runtime/sampling.py), so
    the same object means the same columns, whichever request holds the row now. The per-step columns (uniform,
    list offsets, mask row) are written for every row; the offsets and mask rows only while some row has a list or
    a mask, or had one last time."""

    def __init__(self) -> None:
        self._grow(0)
        self._limit = -1
        self._dummies: dict[int, list[np.ndarray]] = {}  # mask words -> the constant empty-list / no-mask arrays

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * len(getattr(self, "_keys", ())))
        self._fp = np.zeros((cap, abi.F_COLS), dtype=np.float32)
        self._ip = np.zeros((cap, abi.I_COLS), dtype=np.int32)
        self._ip[:, abi.I_MASK_ROW] = -1
        self._plain = cap  # leading rows whose offsets are 0 and mask row -1
        self._keys: list[object] = [None] * cap  # per row: the params object (or _SKIP) its columns come from
        self._bias: list[tuple[np.ndarray, np.ndarray] | None] = [None] * cap  # per row: logit_bias under the limit
        self.pointers = (_pointer(self._fp), _pointer(self._ip))  # where fparams / iparams rows start

    def _write_params(self, i: int, row: SampleRow, vocab_limit: int) -> None:
        """Row i's columns that depend only on its parameters (`pack_rows`' values)."""
        fp, ip = self._fp[i], self._ip[i]
        ip[abi.I_VOCAB_LIMIT] = vocab_limit
        self._bias[i] = None
        if row.skip:
            fp[:] = 0.0
            fp[abi.F_TOP_P] = fp[abi.F_REPETITION] = 1.0
            ip[abi.I_TOP_K], ip[abi.I_TOP_N] = 0, -1
            self._keys[i] = _SKIP
            return
        p = row.params
        fp[[abi.F_TEMPERATURE, abi.F_TOP_P, abi.F_MIN_P, abi.F_REPETITION, abi.F_PRESENCE, abi.F_FREQUENCY]] = [
            p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
        ip[abi.I_TOP_K] = p.top_k
        ip[abi.I_TOP_N] = p.top_logprobs if p.logprobs else -1
        if p.logit_bias:
            ids = np.fromiter(p.logit_bias.keys(), dtype=np.int64, count=len(p.logit_bias))
            vals = np.fromiter(p.logit_bias.values(), dtype=np.float32, count=len(p.logit_bias))
            keep = ids < vocab_limit
            self._bias[i] = (ids[keep].astype(np.int32), vals[keep])
        self._keys[i] = p

    def _dummy_lists(self, mask_words: int) -> list[np.ndarray]:
        """The arguments of a step without logit_bias, penalties or masks: the same (read-only) arrays every time."""
        dummies = self._dummies.get(mask_words)
        if dummies is None:
            dummies = [np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.int32),
                       np.zeros(1, dtype=np.int32), np.zeros((1, mask_words), dtype=np.int32)]
            for a in dummies:
                a.flags.writeable = False
            self._dummies[mask_words] = dummies
        return dummies

    def pack(self, rows: list[SampleRow], vocab_limit: int, mask_words: int) -> list[np.ndarray]:
        """`pack_rows(rows, vocab_limit, mask_words)`; the returned arrays are valid until the next call."""
        n = len(rows)
        if n > len(self._keys):
            self._grow(n)
        if vocab_limit != self._limit:
            self._keys = [None] * len(self._keys)
            self._limit = vocab_limit
        uniform = [0.0] * n
        n_bias, n_pen, mask_row = [0] * n, [0] * n, [-1] * n
        bias_tok: list[np.ndarray] = []
        bias_val: list[np.ndarray] = []
        pen_tok: list[np.ndarray] = []
        pen_cnt: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        keys, bias = self._keys, self._bias
        for i, row in enumerate(rows):
            if keys[i] is not (_SKIP if row.skip else row.params):
                self._write_params(i, row, vocab_limit)
            if row.skip:
                continue
            if row.params.temperature > 0:
                uniform[i] = row.uniform
            if bias[i] is not None:
                bias_tok.append(bias[i][0])
                bias_val.append(bias[i][1])
                n_bias[i] = bias[i][0].size
            if row.penalty_tokens is not None and row.penalty_tokens.size:
                pen_tok.append(row.penalty_tokens.astype(np.int32, copy=False))
                pen_cnt.append(row.penalty_counts.astype(np.int32, copy=False))
                n_pen[i] = row.penalty_tokens.size
            if row.bitmask is not None:
                mask_row[i] = len(masks)
                mask = np.full(mask_words, -1, dtype=np.int32)  # a shorter constraint vocabulary allows the rest
                mask[: min(mask_words, row.bitmask.size)] = row.bitmask[:mask_words]
                masks.append(mask)
        fp, ip = self._fp[:n], self._ip[:n]
        fp[:, abi.F_UNIFORM] = uniform
        plain = not (bias_tok or pen_tok or masks)
        if plain and n <= self._plain:
            return [fp, ip, *self._dummy_lists(mask_words)]
        ip[:, abi.I_MASK_ROW] = mask_row
        for start, end, counts in ((abi.I_BIAS_START, abi.I_BIAS_END, n_bias),
                                   (abi.I_PENALTY_START, abi.I_PENALTY_END, n_pen)):
            ends = np.cumsum(counts)
            ip[:, end] = ends
            ip[:, start] = ends - counts
        if plain:
            self._plain = n
            return [fp, ip, *self._dummy_lists(mask_words)]
        self._plain = 0
        bitmask = np.stack(masks) if masks else np.zeros((1, mask_words), dtype=np.int32)
        return [fp, ip, _cat(bias_tok, "int32"), _cat(bias_val, "float32"), _cat(pen_tok, "int32"),
                _cat(pen_cnt, "int32"), bitmask]


def _pointer(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def _cat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(1, dtype=dtype)


_SKIP = object()  # RowPacker's key of a skipped row
_LIST_SLOTS = (2, 3, 4, 5)  # the sparse lists among `sample_tokens`' host arguments (bias, penalty)
_MAX_DEVICE_BUFFERS = 64  # shapes kept on the device before the cache starts over


@dataclass
class SampleLaunch:
    """A queued `sample_tokens` call: its device outputs and the rows it sampled."""

    out_tok: Any  # int32 [rows, 1 + MAX_TOP] on the device
    out_lp: Any  # float32 [rows, 1 + MAX_TOP]
    rows: list[SampleRow]

    @property
    def wants_logprobs(self) -> list[bool]:
        return [r.params.logprobs and not r.skip for r in self.rows]


class PendingSample:
    """A launch's tokens (and logprobs, when a row asked) on their way to the host; `picks()` waits for them."""

    def __init__(self, sampler: DeviceSampler, launch: SampleLaunch) -> None:
        self.sampler, self.launch = sampler, launch
        wanted = [launch.out_tok] + ([launch.out_lp] if any(launch.wants_logprobs) else [])
        self._read = sampler.link.read(wanted)

    def picks(self) -> list[tuple[int, TokenLogprob | None]]:
        arrays = self._read.wait()
        return self.sampler.picks(self.launch, arrays[0], arrays[1] if len(arrays) > 1 else None)


class DeviceSampler:
    """Calls the library's `sample_tokens` on logits already on the device.

    The host arguments live in device buffers kept from step to step, one per (argument, shape): a buffer whose
    contents did not change is passed again without a copy, a changed one is copied into in place. A decode step at
    the model's default sampling then uploads one small array (the rows' uniforms change every step) and a greedy
    one none, instead of allocating, filling and freeing seven (each a device allocation and a synchronising copy on
    a GPU). Sparse lists are padded to a power of two, so a growing penalty list keeps its buffer; the kernel reads
    each row's [start, end) only. The tokens (and logprobs, when a row asks) come back in one copy each: at once
    (`sample`), or later without making the host wait for work queued after them (`sample_later`, on a GPU through
    runtime/async_copy.py, whose stream-ordered uploads are used then too)."""

    def __init__(self, func: Any, device: tvm.runtime.Device) -> None:
        self.func = func
        self.device = device
        self.link = HostLink(device)
        self._packer = RowPacker()
        self._buffers: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, Any]] = {}
        self._out: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, Any]] = {}  # read-back arrays, pointers
        self._ids: dict[int, tuple[Any, list[Any]]] = {}  # rows -> a device int32 [rows] buffer and its elements
        self.uploads = 0  # host-to-device copies so far (allocations included): what a step costs besides the call

    def _device_arg(self, slot: int, host: np.ndarray) -> Any:
        """A device tensor holding `host`: the kept buffer of this argument and shape, copied into if changed."""
        if slot in _LIST_SLOTS and host.size & (host.size - 1):
            padded = np.zeros(1 << host.size.bit_length(), dtype=host.dtype)
            padded[: host.size] = host
            host = padded
        key = (slot, host.shape)
        kept = self._buffers.get(key)
        if kept is not None and (kept[0] is host or np.array_equal(kept[0], host)):
            return kept[1]
        self.uploads += 1
        if kept is None:
            if len(self._buffers) >= _MAX_DEVICE_BUFFERS:
                self._buffers.clear()
            kept = self._buffers[key] = (host if not host.flags.writeable else host.copy(),
                                         tvm.runtime.empty(host.shape, str(host.dtype), self.device))
        elif kept[0].flags.writeable:
            kept[0][...] = host
        else:
            kept = self._buffers[key] = (host.copy(), kept[1])
        if self.link.asynchronous:
            self.link.upload(kept[1], host)
        elif slot < 2:  # fparams / iparams: `copyfrom`'s runtime call on the packer's rows, without its conversions
            _ffi_api.TVMTensorCopyFromBytes(kept[1], self._packer.pointers[slot], host.nbytes)
        else:
            kept[1].copyfrom(host)
        return kept[1]

    def _read(self, slot: int, tensor: Any) -> np.ndarray:
        """`tensor.numpy()` (its runtime call: copy, then synchronise) into an array kept for the shape."""
        key = (slot, tuple(int(d) for d in tensor.shape))
        out = self._out.get(key)
        if out is None:
            host = np.zeros(key[1], dtype=np.int32 if slot == 0 else np.float32)
            out = self._out[key] = (host, _pointer(host))
        _ffi_api.TVMTensorCopyToBytes(tensor, out[1], out[0].nbytes)
        self.link.synchronized()
        return out[0]

    def launch(self, logits: Any, rows: list[SampleRow], vocab_limit: int | None = None) -> SampleLaunch:
        """Queue one `sample_tokens` call. `logits`: a [len(rows), vocab] float32 device tensor."""
        vocab = int(logits.shape[-1])
        limit = min(vocab_limit or vocab, vocab)
        host = self._packer.pack(rows, limit, (vocab + 31) // 32)
        args = [self._device_arg(slot, a) for slot, a in enumerate(host)]
        out_tok, out_lp = self.func(logits, *args)
        return SampleLaunch(out_tok, out_lp, rows)

    def sample(self, logits: Any, rows: list[SampleRow], vocab_limit: int | None = None
               ) -> list[tuple[int, TokenLogprob | None]]:
        """Sample every row now. Returns (token, logprob or None) per row."""
        launch = self.launch(logits, rows, vocab_limit)
        tokens = self._read(0, launch.out_tok)
        logprobs = self._read(1, launch.out_lp) if any(launch.wants_logprobs) else None
        return self.picks(launch, tokens, logprobs)

    def sample_later(self, logits: Any, rows: list[SampleRow], vocab_limit: int | None = None) -> PendingSample:
        """Queue the sampling and the copy of its results; `picks()` on the result waits for them."""
        return PendingSample(self, self.launch(logits, rows, vocab_limit))

    def next_input_ids(self, launch: SampleLaunch) -> Any:
        """The sampled tokens as a device int32 [rows] tensor (column 0 of `out_tok`), for the next step's
        embedding without a trip through the host: a view for one row, else stream-ordered copies of each row's."""
        n = len(launch.rows)
        if n == 1:
            return element_view(launch.out_tok, 0)
        kept = self._ids.get(n)
        if kept is None:
            buf = tvm.runtime.empty((n,), "int32", self.device)
            kept = self._ids[n] = (buf, [element_view(buf, i) for i in range(n)])
        cols = int(launch.out_tok.shape[-1])
        for i, dst in enumerate(kept[1]):
            _ffi_api.TVMTensorCopyFromTo(element_view(launch.out_tok, i * cols), dst)
        return kept[0]

    @staticmethod
    def picks(launch: SampleLaunch, tokens: np.ndarray, logprobs: np.ndarray | None
              ) -> list[tuple[int, TokenLogprob | None]]:
        """(token, logprob or None) per row, from the host copies of a launch's outputs."""
        if logprobs is None:
            return [(int(t), None) for t in tokens[:, 0]]
        result: list[tuple[int, TokenLogprob | None]] = []
        for i, (row, wants) in enumerate(zip(launch.rows, launch.wants_logprobs)):
            token = int(tokens[i, 0])
            if not wants:
                result.append((token, None))
                continue
            n = row.params.top_logprobs
            alternatives = [(int(t), float(lp)) for t, lp in zip(tokens[i, 1 : n + 1], logprobs[i, 1 : n + 1])]
            result.append((token, TokenLogprob(token, float(logprobs[i, 0]), alternatives)))
        return result
