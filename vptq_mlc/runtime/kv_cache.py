"""The paged KV cache of a model library, driven through TVM's `vm.builtin.kv_state_*` globals.

Why a wrapper: the call-order rules (docs/mlc-artifacts.md §5: add a sequence before its first
forward; every model call sits between begin_forward and end_forward for the same sequence set) live in one
place, and the page accounting the scheduler needs for admission is here too.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from vptq_mlc.runtime.library import ModelLibrary


def _g(name: str) -> Any:
    return tvm.get_global_func(name)


class PagedKVCache:
    """One cache object: `max_batch` sequences sharing `max_total_tokens` token slots in pages."""

    def __init__(self, lib: ModelLibrary, max_batch: int, max_total_tokens: int, prefill_chunk: int,
                 page_size: int = 16, sliding_window: int = -1, attention_sink: int = -1,
                 layers: tuple[int, int] | None = None) -> None:
        """`layers` = (begin, end): a layer-split stage's cache holding only those layers (runtime/split.py)."""
        self.page_size = page_size
        self.sliding_window = sliding_window
        self.attention_sink = max(attention_sink, 0)
        sizes = [ShapeTuple([max_batch]), ShapeTuple([max_total_tokens]), ShapeTuple([prefill_chunk]),
                 ShapeTuple([page_size]), ShapeTuple([int(sliding_window > 0)])]
        if layers is None:
            self.obj = lib.func("create_tir_paged_kv_cache")(*sizes)
        else:
            create = lib.func(lib.metadata["split"]["kv_cache"])
            self.obj = create(*sizes, ShapeTuple([layers[0]]), ShapeTuple([layers[1]]))
        self.total_pages = self.available_pages()
        self._add = _g("vm.builtin.kv_state_add_sequence")
        self._remove = _g("vm.builtin.kv_state_remove_sequence")
        self._begin = _g("vm.builtin.kv_state_begin_forward")
        self._end = _g("vm.builtin.kv_state_end_forward")

    def pages_for(self, tokens: int) -> int:
        """Pages a sequence of `tokens` tokens occupies."""
        return -(-tokens // self.page_size)

    def available_pages(self) -> int:
        return int(_g("vm.builtin.attention_kv_cache_get_num_available_pages")(self.obj))

    def total_tokens(self) -> int:
        """Tokens stored over all sequences."""
        return int(_g("vm.builtin.attention_kv_cache_get_total_sequence_length")(self.obj))

    def add(self, seq_id: int) -> None:
        self._add(self.obj, seq_id)
        if self.sliding_window > 0:
            _g("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")(
                self.obj, seq_id, self.sliding_window, self.attention_sink
            )

    def remove(self, seq_id: int) -> None:
        self._remove(self.obj, seq_id)

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the last `n` tokens of a sequence's KV."""
        _g("vm.builtin.kv_state_popn")(self.obj, seq_id, n)

    def fork(self, parent: int, child: int, length: int) -> None:
        """New sequence `child` holding the first `length` tokens of `parent`: whole pages are shared (reference
        counted, freed with the last sequence using them), a partly filled last page is copied."""
        _g("vm.builtin.kv_state_fork_sequence")(self.obj, parent, child, length)

    def clear(self) -> None:
        _g("vm.builtin.kv_state_clear")(self.obj)

    @contextlib.contextmanager
    def forward(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> Iterator[Any]:
        """begin_forward / end_forward around one model call; yields the cache object to pass to it."""
        self._begin(self.obj, ShapeTuple(list(seq_ids)), ShapeTuple(list(lengths)))
        try:
            yield self.obj
        finally:  # keeps the cache usable after a failed call; the engine then drops those sequences
            self._end(self.obj)


class PrefixCache:
    """KV sequences kept after their requests finished, so a later prompt with the same prefix skips its prefill.

    Each entry is a sequence of the paged cache and the token ids its KV holds (prompt and generated tokens that
    were fed). A new request forks the entry sharing its longest prefix (`PagedKVCache.fork`: whole pages shared,
    not copied). Entries cost pages, so the engine evicts the least recently used one whenever an admission needs
    the pages (`pages`, an upper bound: pages shared with running requests are counted on both sides).
    """

    def __init__(self, kv: PagedKVCache, max_entries: int = 64) -> None:
        self.kv = kv
        self.max_entries = max_entries
        # seq id -> the tokens its KV holds, least recently used first
        self.entries: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.hits = 0  # requests that reused a prefix
        self.hit_tokens = 0  # prompt tokens they did not prefill
        self.lookups = 0

    @property
    def pages(self) -> int:
        return sum(self.kv.pages_for(len(t)) for t in self.entries.values())

    def match(self, prompt: Sequence[int], min_tokens: int,
              live: Sequence[tuple[int, Sequence[int]]] = ()) -> tuple[int, int] | None:
        """(seq id, shared length) of the longest shared prefix among the entries and the `live` (running)
        sequences, at most len(prompt) - 1 tokens (the last prompt token is always run: its logits pick the
        first new token); None below `min_tokens`."""
        self.lookups += 1
        ids = np.asarray(prompt, dtype=np.int64)
        best: tuple[int, int] | None = None
        candidates = [*self.entries.items(), *((s, np.asarray(t, dtype=np.int64)) for s, t in live)]
        for seq_id, tokens in candidates:
            n = min(len(tokens), len(ids) - 1)
            same = tokens[:n] == ids[:n]
            length = n if same.all() else int(np.argmin(same))
            if length >= min_tokens and (best is None or length > best[1]):
                best = (seq_id, length)
        if best is not None:
            if best[0] in self.entries:
                self.entries.move_to_end(best[0])
            self.hits += 1
            self.hit_tokens += best[1]
        return best

    def insert(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Keep sequence `seq_id` (its KV holds exactly `tokens`); entries it extends are dropped (their pages are
        shared with it), and it is dropped if an entry already extends it."""
        ids = np.asarray(tokens, dtype=np.int64)
        for other, held in list(self.entries.items()):
            if len(held) >= len(ids) and np.array_equal(held[: len(ids)], ids):
                self.entries.move_to_end(other)
                self.kv.remove(seq_id)
                return
            if len(held) < len(ids) and np.array_equal(ids[: len(held)], held):
                self.drop(other)
        self.entries[seq_id] = ids
        while len(self.entries) > self.max_entries:
            self.evict()

    @staticmethod
    def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
        n = min(len(a), len(b))
        same = np.asarray(a[:n], dtype=np.int64) == np.asarray(b[:n], dtype=np.int64)
        return n if same.all() else int(np.argmin(same))

    def drop(self, seq_id: int) -> None:
        del self.entries[seq_id]
        self.kv.remove(seq_id)

    def evict(self) -> None:
        """Drop the least recently used entry."""
        self.drop(next(iter(self.entries)))

    def clear(self) -> None:
        """Forget every entry (their sequences are gone, e.g. after `kv_state_clear`)."""
        self.entries.clear()
