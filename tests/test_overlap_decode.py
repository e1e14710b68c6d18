"""Overlapped decoding (runtime/engine.py, `overlap`): the engine queues decode step t+1, fed the tokens the device
sampler left on the device, before it reads step t's tokens. On the CPU the copies are immediate, but the scheduling
is the same as on a GPU, so these tests run it there (forced on) against transformers holding the dense weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reference_model import reference_greedy, reference_model

from vptq_mlc.compile.build import compile_model
from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.sampling import SamplingParams
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

PROMPTS = [[5 + i, 40 + 3 * i, 7, 99 - i, 11 * i + 3][: 3 + i % 3] for i in range(5)]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A library with static decode batches 2 and 3, so a batch of 5 decodes as two pieces (3 + 2)."""
    root = tmp_path_factory.mktemp("overlap")
    ckpt = make_synthetic_checkpoint(root / "ckpt", variant="v8-k256-16", dtype="float32", seed=3)
    model_dir = convert_checkpoint(ckpt, root / "mlc")
    (lib,) = compile_model(model_dir, "llvm", root / "m-llvm.so", static_batches=(2, 3))
    return ckpt, model_dir, lib


@pytest.fixture(scope="module")
def reference(built):
    return reference_model(built[0])


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_overlap_is_off_on_the_cpu_by_default(built):
    assert not Engine(built[1], built[2], device="cpu").overlap


def test_batch_with_pieces_and_staggered_ends_matches_transformers(built, reference):
    """Five requests decoded as pieces of 3 + 2, ending after 4..12 tokens: every step after the first is queued
    before the last one's tokens are read, the batch shrinks as requests end, and each request's tokens are
    transformers' greedy tokens."""
    engine = Engine(built[1], built[2], device="cpu", max_batch_size=5, overlap=True)
    lengths = [12, 4, 9, 6, 12]
    reqs = [engine.add_request(p, _greedy(n)) for p, n in zip(PROMPTS, lengths)]
    queued_steps = 0
    while not all(r.finished for r in reqs):
        engine.step()
        queued_steps += bool(engine._queued)
    assert queued_steps >= 5  # it did overlap (not in the steps where a request ends, nor the one after)
    for r, p, n in zip(reqs, PROMPTS, lengths):
        assert r.finish_reason == "length"
        assert r.output_ids == reference_greedy(reference, p, n), r
    assert not engine.has_unfinished() and engine.kv.total_tokens() == 0


def test_stop_token_read_after_the_next_step_was_queued(built, reference):
    """A request whose stop token arrives while the step after it is already queued: it ends with the tokens before
    the stop token, the queued step's row is dropped, and with the prefix cache on, the sequence kept for it holds
    exactly the tokens it records (the queued step's extra token is popped), so a later request extending it runs
    from the cache and still matches transformers."""
    prompt = [3 + 7 * i % 90 for i in range(20)]  # longer than a KV page: the prefix cache keeps whole pages
    want = reference_greedy(reference, prompt, 10)
    cut = next(i for i in range(3, 10) if want[i] not in want[:i])  # a token that first appears mid-answer
    stop = want[cut]
    engine = Engine(built[1], built[2], device="cpu", max_batch_size=2, overlap=True, prefix_cache=True)
    req = engine.add_request(prompt, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                    stop_token_ids=[stop]))
    while not req.finished:
        engine.step()
    assert req.finish_reason == "stop" and req.output_ids == want[:cut]
    (held,) = engine.prefix_cache.entries.values()
    assert list(held) == prompt + want[:cut]
    assert engine.kv.total_tokens() == len(held)
    follow = prompt + want[:cut] + [stop]
    out = engine.add_request(follow, _greedy(6))
    while not out.finished:
        engine.step()
    assert engine.prefix_cache.hits == 1
    assert out.output_ids == reference_greedy(reference, follow, 6)


def test_cancel_and_a_new_request_between_queued_steps(built, reference):
    """Cancelling one request and adding another while a step is queued: the rest keep their reference tokens."""
    engine = Engine(built[1], built[2], device="cpu", max_batch_size=4, overlap=True)
    a, b, c = (engine.add_request(p, _greedy(10)) for p in PROMPTS[:3])
    for _ in range(4):
        engine.step()
    assert engine._queued
    engine.cancel(b)
    d = engine.add_request(PROMPTS[3], _greedy(7))
    while not all(r.finished for r in (a, c, d)):
        engine.step()
    assert b.finish_reason == "cancelled"
    for r, p, n in ((a, PROMPTS[0], 10), (c, PROMPTS[2], 10), (d, PROMPTS[3], 7)):
        assert r.output_ids == reference_greedy(reference, p, n)
    engine.reset()
    assert not engine._queued and engine.kv.total_tokens() == 0


class FollowsLast:
    """A constraint whose allowed tokens depend on the last accepted one: five tokens after it (mod the vocabulary).
    A bitmask built before the previous token was accepted would allow other tokens."""

    def __init__(self, first: int, vocab: int) -> None:
        self.last, self.vocab = first, vocab
        self.accepted: list[int] = []

    def allowed(self, last: int) -> list[int]:
        return [(last * 7 + 3 + k) % self.vocab for k in range(5)]

    def fill_bitmask(self, bitmask) -> None:  # noqa: ANN001
        bits = np.zeros(bitmask.size * 32, dtype=np.uint8)
        bits[self.allowed(self.last)] = 1
        bitmask[:] = np.packbits(bits, bitorder="little").view("<i4")

    def accept(self, token: int) -> None:
        assert token in self.allowed(self.last), (token, self.last)
        self.accepted.append(token)
        self.last = token

    def is_terminated(self) -> bool:
        return False


def test_rows_that_need_their_last_token_see_it(built):
    """Penalties and constraints need each step's token on the host before the next step samples: the next decode
    call is queued first, its sampling only after the token is read. A repetition penalty of 1e4 with greedy
    decoding must then never repeat a token (the model does, unpenalised), and a constraint that allows only
    successors of the last token is met at every step; logprobs come along; all tokens as step by step."""
    vocab = 512
    outs = []
    for overlap in (False, True):
        engine = Engine(built[1], built[2], device="cpu", max_batch_size=3, overlap=overlap)
        follow = FollowsLast(PROMPTS[2][-1], vocab)
        reqs = [engine.add_request(PROMPTS[1], _greedy(14)),
                engine.add_request(PROMPTS[1], _greedy(14, repetition_penalty=1e4)),
                engine.add_request(PROMPTS[2], _greedy(14, logprobs=True, top_logprobs=3), constraint=follow)]
        queued = 0
        while not all(r.finished for r in reqs):
            engine.step()
            queued += bool(engine._queued)
        assert (queued >= 8) == overlap
        assert len(set(reqs[1].output_ids)) == len(reqs[1].output_ids) == 14
        assert follow.accepted == reqs[2].output_ids and len(reqs[2].output_logprobs) == 14
        outs.append([r.output_ids for r in reqs] + [[lp.logprob for lp in reqs[2].output_logprobs]])
    plain = outs[0][0]
    assert len(set(plain)) < len(plain)  # without the penalty this model repeats itself after the same prompt
    assert outs[0] == outs[1]


def test_seeded_sampling_is_the_same_with_and_without_overlap(built):
    """The device sampler's draws depend only on (seed, draw index), not on when the tokens are read."""
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    outs = []
    for overlap in (False, True):
        engine = Engine(built[1], built[2], device="cpu", max_batch_size=3, overlap=overlap)
        reqs = [engine.add_request(p, params) for p in PROMPTS[:3]]
        while not all(r.finished for r in reqs):
            engine.step()
        outs.append([r.output_ids for r in reqs])
    assert outs[0] == outs[1]
