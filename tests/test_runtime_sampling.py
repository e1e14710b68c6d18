"""runtime/sampling.py against transformers' logits processors (the reference semantics) on the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vptq_mlc.errors import GenerationError
from vptq_mlc.runtime.sampling import (
    GREEDY_BELOW_TEMPERATURE,
    Sampler,
    SamplingParams,
    StopStrings,
    bitmask_allows,
    process_logits,
    softmax,
)


def hf_scores(logits: np.ndarray, seen: np.ndarray, p: SamplingParams) -> np.ndarray:
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature > 0:
        procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            procs.append(MinPLogitsWarper(p.min_p))
    ids = torch.tensor(seen[None, :], dtype=torch.long)
    return procs(ids, torch.tensor(logits[None, :], dtype=torch.float64))[0].numpy()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=1.3, top_k=20, top_p=0.6, repetition_penalty=1.15),
        SamplingParams(temperature=0.5, top_p=0.05),  # keeps at least one token
        SamplingParams(temperature=1.0, repetition_penalty=0.8),  # < 1 encourages repeats
        SamplingParams(temperature=0.8, min_p=0.1),
        SamplingParams(temperature=1.2, top_k=30, top_p=0.9, min_p=0.05),
    ],
)
def test_processed_scores_match_transformers(params: SamplingParams) -> None:
    rng = np.random.default_rng(0)
    for trial in range(5):
        logits = rng.normal(0, 3, size=97).astype(np.float32)
        logits[7] = logits[11]  # a tie, to exercise top-k's boundary rule
        seen = rng.integers(0, 97, size=12 + trial)
        ours = process_logits(logits, params, seen)
        ref = hf_scores(logits, seen, params)
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
        finite = ~np.isinf(ref)
        np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-12, atol=1e-12)


def test_greedy_is_argmax_after_penalty() -> None:
    logits = np.array([1.0, 5.0, 4.9, -2.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert s.sample(logits, np.array([], dtype=np.int64)) == 1
    assert s.sample(logits, np.array([1])) == 2  # 5/2 < 4.9


def test_draws_follow_the_filtered_distribution() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, size=12).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=8, top_p=0.9, seed=123)
    probs = softmax(hf_scores(logits, np.array([], dtype=np.int64), params))
    s = Sampler(params)
    n = 20000
    counts = np.bincount([s.sample(logits, np.array([], dtype=np.int64)) for _ in range(n)], minlength=12)
    assert counts[probs == 0].sum() == 0
    np.testing.assert_allclose(counts / n, probs, atol=4 * np.sqrt(probs * (1 - probs) / n).max() + 1e-3)


def test_seed_reproducible_and_independent_per_request() -> None:
    logits = np.random.default_rng(2).normal(size=50).astype(np.float32)
    seen = np.array([], dtype=np.int64)
    a = Sampler(SamplingParams(temperature=1.0, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, seed=7))
    c = Sampler(SamplingParams(temperature=1.0, seed=8))
    ta = [a.sample(logits, seen) for _ in range(30)]
    for _ in range(5):  # another request drawing in between must not disturb `b`
        c.sample(logits, seen)
    assert ta == [b.sample(logits, seen) for _ in range(30)]


@pytest.mark.parametrize(
    "kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"repetition_penalty": 0},
           {"repetition_penalty": 1e-9}, {"repetition_penalty": 1e9}, {"max_tokens": 0}, {"stop": [""]}]
)
def test_invalid_params_raise(kw: dict) -> None:
    with pytest.raises(GenerationError):
        SamplingParams(**kw).validate()


def test_stop_strings_cut_and_hold_back() -> None:
    s = StopStrings(["</end>", "STOP"])
    out = [s.feed(x) for x in ["Hello <", "/en", "d> tail"]]
    assert "".join(out) == "Hello " and s.stopped
    assert out[0] == "Hello "  # "<" is held back: it may start "</end>"
    s = StopStrings(["STOP"])
    out = "".join(s.feed(x) for x in ["ST", "ART", " S"]) + s.flush()
    assert out == "START S" and not s.stopped
    s = StopStrings(["ab"])
    assert s.feed("xxab") == "xx" and s.stopped and s.feed("more") == "" and s.flush() == ""


def test_presence_frequency_penalties_follow_the_openai_formula() -> None:
    """OpenAI's documented rule: mu[j] -= c[j] * frequency_penalty + float(c[j] > 0) * presence_penalty,
    c[j] = how often token j was generated so far (prompt tokens do not count)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, size=40).astype(np.float32)
    prompt = np.array([1, 2, 3])
    generated = np.array([5, 5, 7, 5, 9])
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    want = logits.astype(np.float64).copy()
    for j in range(40):
        c = int((generated == j).sum())
        want[j] -= c * 0.25 + float(c > 0) * 0.5
    got = process_logits(logits, params, np.concatenate([prompt, generated]), generated)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(GenerationError, match="presence_penalty"):
        SamplingParams(presence_penalty=3).validate()


def test_logit_bias_adds_to_raw_logits() -> None:
    logits = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, logit_bias={0: 100.0, 3: -100.0, 99: 5.0})  # 99: past the vocab
    np.testing.assert_array_equal(process_logits(logits, params, np.array([], dtype=np.int64)),
                                  [100.0, 1.0, 2.0, -97.0])
    assert Sampler(params).sample(logits, np.array([], dtype=np.int64)) == 0


def test_logprobs_are_log_softmax_after_temperature_before_filters() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, size=50).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=3, logprobs=True, top_logprobs=5, seed=1)
    token, lp = Sampler(params).sample_with_logprob(logits, np.array([], dtype=np.int64))
    ref = torch.log_softmax(torch.tensor(logits, dtype=torch.float64) / 0.7, dim=-1).numpy()
    assert lp is not None and lp.token == token
    assert lp.logprob == pytest.approx(ref[token], abs=1e-12)
    order = np.argsort(-ref)[:5]
    assert [t for t, _ in lp.top] == list(order)
    np.testing.assert_allclose([v for _, v in lp.top], ref[order], atol=1e-12)
    assert Sampler(SamplingParams(temperature=0.7)).sample_with_logprob(logits, np.array([]))[1] is None


def test_bitmask_restricts_tokens() -> None:
    allowed = [3, 31, 32, 70]
    words = np.zeros(3, dtype=np.uint32)
    for t in allowed:
        words[t // 32] |= np.uint32(1) << np.uint32(t % 32)
    bitmask = words.view(np.int32)
    assert list(np.flatnonzero(bitmask_allows(bitmask, 71))) == allowed
    logits = np.zeros(71, dtype=np.float32)
    logits[5] = 10.0  # the most likely token is not allowed
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    draws = {s.sample(logits, np.array([], dtype=np.int64), bitmask=bitmask) for _ in range(200)}
    assert draws == set(allowed)


@pytest.mark.parametrize(
    "field,value", [("min_p", 1.5), ("seed", -1), ("top_logprobs", 21), ("logit_bias", {1: 101.0})]
)
def test_new_fields_validated(field: str, value: object) -> None:
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value}).validate()


def test_tiny_temperature_is_greedy() -> None:
    """Below GREEDY_BELOW_TEMPERATURE a request is greedy (float32 logits / T would overflow): the argmax, as
    transformers' greedy search picks it, and the same token for any seed."""
    logits = np.random.default_rng(4).normal(0.0, 3.0, 300).astype(np.float32)
    want = int(torch.argmax(torch.from_numpy(logits)))
    for t in (1e-39, 1e-7, GREEDY_BELOW_TEMPERATURE / 2):
        params = SamplingParams(temperature=t, seed=3)
        assert params.temperature == 0.0
        assert Sampler(params).sample(logits, np.array([], dtype=np.int64)) == want
    assert SamplingParams(temperature=GREEDY_BELOW_TEMPERATURE).temperature == GREEDY_BELOW_TEMPERATURE
