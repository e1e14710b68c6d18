"""runtime/async_copy.py's buffer bookkeeping on the CPU (staging in ordinary host tensors, copies immediate): the
values read and uploaded are the ones given, buffers are reused round-robin only after the read fencing them, and a
synchronous read clears every fence. The CUDA path (page-locked buffers, queued copies) is
tests/gpu/test_overlap_gpu.py."""

from __future__ import annotations

import numpy as np
import tvm

from vptq_mlc.runtime.async_copy import RING, HostLink, element_view


def test_uploads_and_reads_round_trip_through_reused_buffers():
    link = HostLink(tvm.cpu(), staging=tvm.cpu())
    assert link.asynchronous
    rng = np.random.default_rng(1)
    dst = tvm.runtime.empty((5, 8), "float32", tvm.cpu())
    ids = tvm.runtime.empty((3, 21), "int32", tvm.cpu())
    seen_slots = set()
    for _ in range(3 * RING):
        values = rng.standard_normal((5, 8)).astype(np.float32)
        link.upload(dst, values)
        tokens = rng.integers(0, 1000, (3, 21)).astype(np.int32)
        ids.copyfrom(tokens)
        pending = link.read([dst, ids])
        got_values, got_tokens = pending.wait()
        np.testing.assert_array_equal(got_values, values)
        np.testing.assert_array_equal(got_tokens, tokens)
        seen_slots.add(got_values.ctypes.data)
        assert all(s.fence is None for ring in link._staging.values() for s in ring)  # the wait released them
    assert len(seen_slots) == RING  # the reads cycled through the ring


def test_a_reused_staging_buffer_waits_for_its_fence():
    link = HostLink(tvm.cpu(), staging=tvm.cpu())
    dst = tvm.runtime.empty((4,), "int32", tvm.cpu())
    link.upload(dst, np.arange(4, dtype=np.int32))
    first = link.read([dst])
    for k in range(1, RING):
        link.upload(dst, np.arange(4, dtype=np.int32) + k)
        link.read([dst])
    assert not first.arrived
    link.upload(dst, np.full(4, 7, dtype=np.int32))  # the first staging buffer again: its fence is waited for
    assert first.arrived
    np.testing.assert_array_equal(dst.numpy(), np.full(4, 7))
    link.synchronized()
    assert all(s.fence is None for ring in link._staging.values() for s in ring)


def test_element_view_is_one_element_in_place():
    t = tvm.runtime.tensor(np.arange(12, dtype=np.int32).reshape(4, 3))
    assert [int(element_view(t, i).numpy()[0]) for i in (0, 3, 6, 11)] == [0, 3, 6, 11]
