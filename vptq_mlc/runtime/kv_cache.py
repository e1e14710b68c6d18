"""The paged KV cache of a model library, driven through TVM's `vm.builtin.kv_state_*` globals.

Why a wrapper: the call-order rules (docs/mlc-artifacts.md §5: add a sequence before its first
forward; every model call sits between begin_forward and end_forward for the same sequence set) live in one
place, and the page accounting the scheduler needs for admission is here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

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
