"""Checks of the compiled sampler (`sample_tokens`) against the numpy reference (runtime/sampling.py), shared by
the CPU test (tests/test_device_sampler.py) and the CUDA one (tests/gpu/test_device_sampler_gpu.py).

Distribution bound: with N draws from a distribution over V tokens, P(TV(empirical, true) >= eps) <= 2^V
exp(-2 N eps^2) (the L1 deviation bound of Weissman et al. 2003, TV = L1 / 2 with L1 >= 2 eps). For V = 32,
N = 10^5, eps = 0.02: 2^32 e^-80 < 1e-25, so a sampler whose true TV from the reference exceeded ~0.02 fails and a
correct one essentially never does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm

from vptq_mlc.artifact import sampler_abi as abi
from vptq_mlc.runtime.device_sampler import DeviceSampler, SampleRow, pack_rows
from vptq_mlc.runtime.sampling import SamplingParams, penalized_scores, process_logits, softmax, token_logprob

DRAWS = 100_000
SMALL_VOCAB = 32
TV_BOUND = 0.02

PROMPT = np.array([3, 3, 7, 11, 30], dtype=np.int64)
GENERATED = np.array([7, 7, 7, 12, 1], dtype=np.int64)
MASK_ALLOWED = [0, 1, 2, 3, 5, 8, 13, 21, 30, 31]


def bitmask_for(allowed: list[int], vocab: int) -> np.ndarray:
    bits = np.zeros(((vocab + 31) // 32) * 32, dtype=np.uint8)
    bits[allowed] = 1
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


# (name, SamplingParams kwargs, uses penalties, uses bitmask)
SETTINGS: list[tuple[str, dict[str, Any], bool, bool]] = [
    ("temperature", dict(temperature=0.7), False, False),
    ("top_k", dict(temperature=1.0, top_k=5), False, False),
    ("top_p", dict(temperature=0.8, top_p=0.7), False, False),
    ("min_p", dict(temperature=1.0, min_p=0.15), False, False),
    ("penalties", dict(temperature=0.9, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3), True,
     False),
    ("logit_bias", dict(temperature=1.0, logit_bias={4: 3.0, 9: -100.0, 17: 1.5}), False, False),
    ("bitmask", dict(temperature=1.0, top_p=0.9), False, True),
    ("combined", dict(temperature=0.6, top_k=12, top_p=0.85, min_p=0.02, repetition_penalty=1.2,
                      logit_bias={2: 2.0}), True, True),
]


def build_sampler(kind: str, device: tvm.runtime.Device, arch: str | None = None) -> DeviceSampler:
    """The sampler alone as a tiny library, built as compile/build.py builds a model for `kind` ("llvm", "cuda")."""
    from tvm import relax  # the compiler: a runtime-only TVM loads the sampler from a model library instead

    from vptq_mlc.compile.sampler import add_sampler
    from vptq_mlc.compile.targets import resolve_backend

    bt = resolve_backend(kind, arch)[0]
    bt.prepare()
    mod = add_sampler(tvm.IRModule(), bt.target)
    with bt.target:
        mod = bt.relax_pipeline()(mod)
    vm = relax.VirtualMachine(relax.build(mod, bt.target, relax_pipeline=None), device)
    return DeviceSampler(vm["sample_tokens"], device)


def penalty_lists(params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """What a Request uploads: every seen token with its generated count."""
    seen = np.unique(np.concatenate([PROMPT, GENERATED]))
    counts = np.array([(GENERATED == t).sum() for t in seen], dtype=np.int32)
    return seen.astype(np.int32), counts


def row_for(params: SamplingParams, penalties: bool, mask: np.ndarray | None, uniform: float) -> SampleRow:
    pt, pc = penalty_lists(params) if penalties else (None, None)
    return SampleRow(params, uniform, pt, pc, mask)


def reference_probs(logits: np.ndarray, params: SamplingParams, penalties: bool,
                    mask: np.ndarray | None) -> np.ndarray:
    seen = np.concatenate([PROMPT, GENERATED]) if penalties else np.empty(0, dtype=np.int64)
    generated = GENERATED if penalties else None
    return softmax(process_logits(logits, params, seen, generated, mask))


def uniforms_24bit(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` uniforms in [0, 1) on the 2^-24 grid the runtime's seeded draws use (runtime/device_sampler.py)."""
    return rng.integers(0, 1 << 24, size=n) / float(1 << 24)


def reference_token(cdf: np.ndarray, uniform: float) -> int:
    """The reference sampler's token for `uniform`: its walk of the (unnormalised) cdf in id order."""
    return int(min(np.searchsorted(cdf, uniform * cdf[-1], side="right"), len(cdf) - 1))


def sampled_tokens(sampler: DeviceSampler, logits: np.ndarray, rows: list[SampleRow]) -> list[int]:
    """The device sampler's token for each row of `logits`."""
    return [t for t, _ in sampler.sample(tvm.runtime.tensor(logits, sampler.device), rows)]


def draw_histogram(sampler: DeviceSampler, logits: np.ndarray, params: SamplingParams, penalties: bool,
                   mask: np.ndarray | None, draws: int = DRAWS, chunk: int = 25_000) -> np.ndarray:
    """`draws` tokens from the device sampler, as frequencies; rows of one call share the logits."""
    rng = np.random.default_rng(1234)
    counts = np.zeros(logits.size, dtype=np.int64)
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        uniforms = uniforms_24bit(rng, n)
        # one packed row repeated: every row points at the same bias / penalty / bitmask entries
        fp, ip, *lists = pack_rows([row_for(params, penalties, mask, 0.0)], logits.size, (logits.size + 31) // 32)
        fp = np.repeat(fp, n, axis=0)
        fp[:, abi.F_UNIFORM] = uniforms
        host = [np.repeat(logits[None].astype(np.float32), n, axis=0), fp, np.repeat(ip, n, axis=0), *lists]
        out_tok, _ = sampler.func(*(tvm.runtime.tensor(a, sampler.device) for a in host))
        counts += np.bincount(out_tok.numpy()[:, 0], minlength=logits.size)
    return counts / draws


def check_distributions(sampler: DeviceSampler, chunk: int = 25_000) -> None:
    """`chunk`: rows per sampler call (a model library's sampler is planned for at most its max batch)."""
    logits = np.random.default_rng(7).normal(0.0, 2.0, SMALL_VOCAB).astype(np.float32)
    failures = []
    for name, kwargs, penalties, masked in SETTINGS:
        params = SamplingParams(**kwargs)
        mask = bitmask_for(MASK_ALLOWED, SMALL_VOCAB) if masked else None
        want = reference_probs(logits, params, penalties, mask)
        got = draw_histogram(sampler, logits, params, penalties, mask, chunk=chunk)
        tv = 0.5 * np.abs(got - want).sum()
        never = got[want == 0].sum()
        if tv > TV_BOUND or never > 0:
            failures.append(f"{name}: TV {tv:.4f} (bound {TV_BOUND}), mass on excluded tokens {never}")
    assert not failures, failures


def check_greedy(sampler: DeviceSampler, vocab: int) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, (6, vocab)).astype(np.float32)
    logits[1, [5, vocab - 1]] = logits[1].max() + 1.0  # a tie: the first index wins, as np.argmax
    rows = [SampleRow(SamplingParams(temperature=0.0)) for _ in range(6)]
    assert sampled_tokens(sampler, logits, rows) == logits.argmax(axis=1).tolist()


def check_same_uniform_same_token(sampler: DeviceSampler, vocab: int, rows: int = 64) -> None:
    """With the uniform the reference would draw, the token is the reference's (its cdf walk in id order)."""
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((rows, vocab)) * rng.uniform(1, 6, (rows, 1))).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    uniforms = uniforms_24bit(rng, rows)
    got = sampled_tokens(sampler, logits, [SampleRow(params, float(u)) for u in uniforms])
    assert got == [reference_token(np.cumsum(reference_probs(row, params, False, None)), u)
                   for row, u in zip(logits, uniforms)]


def check_logprobs(sampler: DeviceSampler, vocab: int) -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 2.5, (4, vocab)).astype(np.float32)
    settings = [(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5), False, None),
                (SamplingParams(temperature=0.7, top_p=0.9, logprobs=True, top_logprobs=20), False, None),
                (SamplingParams(temperature=1.3, top_k=3, repetition_penalty=1.3, presence_penalty=0.4,
                                frequency_penalty=0.2, logprobs=True, top_logprobs=3, logit_bias={1: 4.0}), True,
                 None),
                (SamplingParams(temperature=1.0, logprobs=True, top_logprobs=0), False,
                 bitmask_for(MASK_ALLOWED, vocab))]
    rows = [row_for(p, pen, mask, 0.37) for p, pen, mask in settings]
    out = sampler.sample(tvm.runtime.tensor(logits, sampler.device), rows)
    for (params, pen, mask), row_logits, (token, lp) in zip(settings, logits, out):
        seen = np.concatenate([PROMPT, GENERATED]) if pen else np.empty(0, dtype=np.int64)
        base = penalized_scores(row_logits, params, seen, GENERATED if pen else None, mask)
        want = token_logprob(base, token, params.top_logprobs)
        assert lp is not None and lp.token == token
        assert abs(lp.logprob - want.logprob) <= 1e-4, (lp.logprob, want.logprob)
        assert [t for t, _ in lp.top] == [t for t, _ in want.top]
        np.testing.assert_allclose([v for _, v in lp.top], [v for _, v in want.top], atol=1e-4, rtol=0)


def check_degenerate_rows(sampler: DeviceSampler, vocab: int) -> None:
    """Rows whose scores are not finite numbers: a temperature so small that float32 logits / T overflow (it is
    greedy: the token is numpy's argmax, its logprob the untempered one), and NaN logits, infinite logits and a
    constraint that allows nothing (no token kept: the kernels must still return token ids inside the vocabulary,
    never read or write outside their buffers)."""
    rng = np.random.default_rng(13)
    logits = rng.normal(0.0, 4.0, (8, vocab)).astype(np.float32)
    logits[2] = np.nan
    logits[3, [3, vocab // 2]] = np.inf
    logits[4, vocab // 3] = np.nan
    nothing = np.zeros((vocab + 31) // 32, dtype=np.int32)
    sampled = [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=5), dict(temperature=1.0, min_p=0.2),
               dict(temperature=1.0)]
    rows = [SampleRow(SamplingParams(temperature=1e-39, top_p=0.9, logprobs=True, top_logprobs=3), 0.5),
            SampleRow(SamplingParams(temperature=3e-6, logprobs=True, top_logprobs=2), 0.99)]
    rows += [SampleRow(SamplingParams(**sampled[i % len(sampled)], logprobs=True, top_logprobs=4), 0.3)
             for i in range(3)]
    rows += [SampleRow(SamplingParams(**kw, logprobs=True, top_logprobs=2), 0.6, bitmask=nothing) for kw in sampled[:3]]
    out = sampler.sample(tvm.runtime.tensor(logits, sampler.device), rows)
    for i in (0, 1):
        want = token_logprob(logits[i].astype(np.float64), int(np.argmax(logits[i])), rows[i].params.top_logprobs)
        token, lp = out[i]
        assert token == int(np.argmax(logits[i])) and lp is not None and abs(lp.logprob - want.logprob) <= 1e-4
        assert [t for t, _ in lp.top] == [t for t, _ in want.top]
    for token, lp in out[2:]:
        assert 0 <= token < vocab and lp is not None and all(0 <= t < vocab for t, _ in lp.top), out


def check_vocab_limit_and_batch_independence(sampler: DeviceSampler, vocab: int) -> None:
    rng = np.random.default_rng(9)
    logits = rng.normal(0.0, 1.0, (3, vocab)).astype(np.float32)
    logits[:, vocab - 8 :] += 50.0  # only reachable if the limit were ignored
    params = SamplingParams(temperature=1.0, seed=42)
    rows = [SampleRow(params, 0.25), SampleRow(SamplingParams(temperature=0.0)), SampleRow(params, 0.9)]
    batch = sampler.sample(tvm.runtime.tensor(logits, sampler.device), rows, vocab_limit=vocab - 8)
    assert all(t < vocab - 8 for t, _ in batch)
    alone = sampler.sample(tvm.runtime.tensor(logits[2:3].copy(), sampler.device), rows[2:], vocab_limit=vocab - 8)
    assert alone[0][0] == batch[2][0]


def check_settings_same_uniform(sampler: DeviceSampler, vocab: int, uniforms: int = 8) -> None:
    """Every setting of SETTINGS at `vocab` (N(0, 2) logits): with a given uniform, the reference's token (its cdf
    walk in id order). Exact, so few draws suffice; it runs where 10^5 draws per setting would be too slow."""
    logits = np.random.default_rng(7).normal(0.0, 2.0, vocab).astype(np.float32)
    us = uniforms_24bit(np.random.default_rng(1), uniforms)
    failures = []
    for name, kwargs, penalties, masked in SETTINGS:
        params = SamplingParams(**kwargs)
        mask = bitmask_for(MASK_ALLOWED, vocab) if masked else None
        cdf = np.cumsum(reference_probs(logits, params, penalties, mask))
        rows = [row_for(params, penalties, mask, float(u)) for u in us]
        got = sampled_tokens(sampler, np.repeat(logits[None], uniforms, axis=0), rows)
        want = [reference_token(cdf, u) for u in us]
        if got != want:
            failures.append(f"{name}: {got} != {want}")
    assert not failures, failures


PROFILE_SETTINGS = [SamplingParams(temperature=0.7, top_p=0.9),
                    SamplingParams(temperature=0.6, top_k=40, top_p=0.95, min_p=0.01),
                    SamplingParams(temperature=1.0, top_k=2000), SamplingParams(temperature=0.8, min_p=0.001)]


def check_profiles_same_uniform(sampler: DeviceSampler, vocab: int, rows: int = 2,
                                settings: list[SamplingParams] = PROFILE_SETTINGS) -> None:
    """bench sampler's logits profiles (a confident model, and a flat one whose nucleus is a large share of the
    vocabulary) under model-like settings: with a given uniform, the reference's token."""
    from vptq_mlc.bench.sampler import make_logits

    failures = []
    for profile in ("peaked", "flat"):
        logits = make_logits(profile, rows, vocab, seed=3)
        for params in settings:
            us = uniforms_24bit(np.random.default_rng(5), len(logits))
            got = sampled_tokens(sampler, logits, [SampleRow(params, float(u)) for u in us])
            want = [reference_token(np.cumsum(reference_probs(row, params, False, None)), u)
                    for row, u in zip(logits, us)]
            if got != want:
                failures.append(f"{profile} {params}: {got} != {want}")
    assert not failures, failures


def tie_kept_cdf(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """The cdf (in id order) of temperature + top-p sampling where tokens of equal score are kept or dropped
    together: token i is kept iff the probability of the tokens scoring strictly higher is < top_p (the compiled
    sampler's rule; the numpy reference instead drops the lower-id part of a tie group on the boundary). Scores are
    the float32 `logits * (1 / temperature)` the sampler computes, probabilities float64."""
    x = (logits.astype(np.float32) * np.float32(1 / np.float32(temperature))).astype(np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-x, kind="stable")
    desc = x[order]
    first_equal = np.searchsorted(-desc, -desc, side="left")  # each sorted token's first tie partner
    mass = np.cumsum(probs[order])
    higher = np.where(first_equal > 0, mass[np.maximum(first_equal - 1, 0)], 0.0)
    kept = np.empty(x.size, dtype=bool)
    kept[order] = higher < top_p
    return np.cumsum(np.where(kept, probs, 0.0))


# How far (a share of the kept mass) the sampler's cdf walk may land from the float64 one: float32 running sums over
# ~10^5 tokens drift by ~sqrt(n) * 2^-24 ~ 2e-5 (one token of a 60,000-token nucleus holds about that much), while a
# kept set off by one tie group of a tied vocabulary moves the cdf by ~1e-3.
TIED_CDF_TOLERANCE = 1e-4


def check_tied_logits_same_uniform(sampler: DeviceSampler, vocab: int, rows: int = 2, uniforms: int = 2) -> None:
    """bench sampler's `random_model` logits (what bench e2e's random weights give: 256 values, each repeated across
    the vocabulary, so every score is tied with hundreds of others and tens of thousands of tokens are in the
    nucleus) at the model's default settings: with a given uniform, a token `tie_kept_cdf` keeps, whose cdf step
    holds the uniform up to TIED_CDF_TOLERANCE of the kept mass (the nucleus is too large for exact float32 walks)."""
    from vptq_mlc.bench.sampler import make_logits

    logits = make_logits("random_model", rows, vocab, seed=3)
    failures = []
    for temperature, top_p in ((0.6, 0.9), (0.8, 0.95)):
        params = SamplingParams(temperature=temperature, top_p=top_p)
        cdfs = [tie_kept_cdf(row, temperature, top_p) for row in logits]
        for u in uniforms_24bit(np.random.default_rng(5), uniforms):
            got = sampled_tokens(sampler, logits, [SampleRow(params, float(u))] * rows)
            for row, (token, cdf) in enumerate(zip(got, cdfs)):
                below = cdf[token - 1] if token > 0 else 0.0
                off = max(below - u * cdf[-1], u * cdf[-1] - cdf[token], 0.0) / cdf[-1]
                if cdf[token] <= below or off > TIED_CDF_TOLERANCE:
                    failures.append(f"T {temperature} top_p {top_p} u {u} row {row}: token {token} (the tie rule's: "
                                    f"{reference_token(cdf, u)}; kept {cdf[token] > below}, off by {off:.2e})")
    assert not failures, failures


def check_rows_change_hands(sampler: DeviceSampler, calls: int = 6, rows: int = 8) -> None:
    """One sampler over several calls whose rows pass between settings (a request finishing and another taking its
    row), skip rows and a changed row count and vocabulary limit among them: every row's token is the reference's
    for that row's own settings and uniform (its cdf walk in id order), so no row keeps what an earlier holder had
    packed (its logit_bias, penalties, top_k, mask)."""
    vocab = SMALL_VOCAB
    rng = np.random.default_rng(17)
    failures = []
    for call in range(calls):
        n = rows if call % 3 else max(1, rows - 3)  # the row count changes, and the rows come back
        limit = vocab - 1 if call == 4 else vocab  # PROMPT's ids stay under it (the reference indexes them)
        logits = rng.normal(0.0, 2.0, (n, vocab)).astype(np.float32)
        logits[:, limit:] += 50.0  # only reachable if the limit were ignored
        order = rng.permutation(len(SETTINGS))
        us = uniforms_24bit(rng, n)
        picked, sample_rows = [], []
        for i in range(n):
            name, kwargs, penalties, masked = SETTINGS[order[i % len(SETTINGS)]]
            params = SamplingParams(**kwargs) if call % 2 else SamplingParams(**kwargs, seed=call)  # new objects
            mask = bitmask_for(MASK_ALLOWED, vocab) if masked else None
            skip = (call + i) % 5 == 0
            picked.append((name, params, penalties, mask, skip))
            sample_rows.append(SampleRow(params, skip=True) if skip else row_for(params, penalties, mask, float(us[i])))
        got = sampler.sample(tvm.runtime.tensor(logits, sampler.device), sample_rows, vocab_limit=limit)
        for i, ((name, params, penalties, mask, skip), (token, _)) in enumerate(zip(picked, got)):
            if skip:
                continue
            want = reference_token(np.cumsum(reference_probs(logits[i, :limit], params, penalties, mask)), us[i])
            if token != want:
                failures.append(f"call {call} row {i} ({name}): {token} != {want}")
    assert not failures, failures


def check_packer_matches_pack_rows(steps: int = 40) -> None:
    """RowPacker, which keeps its arrays between calls, packs exactly what `pack_rows` packs from scratch, as rows
    change settings, skip, shrink and grow and the vocabulary limit moves."""
    from vptq_mlc.runtime.device_sampler import RowPacker

    vocab = SMALL_VOCAB
    rng = np.random.default_rng(23)
    packer = RowPacker()
    pool = [(SamplingParams(**kwargs), penalties, masked) for _, kwargs, penalties, masked in SETTINGS]
    pool.append((SamplingParams(temperature=0.0, logprobs=True, top_logprobs=4, logit_bias={31: 9.0}), False, False))
    for step in range(steps):
        n = int(rng.integers(1, 12))
        limit = int(rng.choice([vocab, vocab - 3, 30]))
        sample_rows = []
        for _ in range(n):
            params, penalties, masked = pool[int(rng.integers(len(pool)))]
            mask = bitmask_for(MASK_ALLOWED, vocab)[: int(rng.integers(1, 2))] if masked else None
            row = row_for(params, penalties, mask, float(rng.random()))
            row.skip = bool(rng.random() < 0.2)
            sample_rows.append(row)
        want = pack_rows(sample_rows, limit, 1)
        got = packer.pack(sample_rows, limit, 1)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (step, a, b)
