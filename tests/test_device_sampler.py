"""The sampler compiled into model libraries, on the CPU, against the numpy reference (checks in sampler_checks)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import sampler_checks as checks
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from required import missing

from vptq_mlc.runtime.device_sampler import counter_uniform
from vptq_mlc.runtime.sampling import REPETITION_PENALTY_RANGE, SamplingParams, penalized_scores


@pytest.fixture(scope="module")
def sampler() -> checks.DeviceSampler:
    return checks.build_sampler("llvm", tvm.cpu())


def test_greedy_is_argmax(sampler: checks.DeviceSampler) -> None:
    checks.check_greedy(sampler, 128256)


def test_distributions_match_reference(sampler: checks.DeviceSampler) -> None:
    checks.check_distributions(sampler)


def test_same_uniform_gives_reference_token(sampler: checks.DeviceSampler) -> None:
    checks.check_same_uniform_same_token(sampler, 128256, rows=8)
    checks.check_same_uniform_same_token(sampler, 1000)


def test_logprobs_match_reference(sampler: checks.DeviceSampler) -> None:
    checks.check_logprobs(sampler, 1000)


def test_degenerate_rows_stay_in_the_vocabulary(sampler: checks.DeviceSampler) -> None:
    checks.check_degenerate_rows(sampler, 1000)


def test_vocab_limit_and_rows_independent(sampler: checks.DeviceSampler) -> None:
    checks.check_vocab_limit_and_batch_independence(sampler, 500)


def test_counter_uniform() -> None:
    """Depends only on (seed, step), stays in [0, 1) and looks uniform (Kolmogorov-Smirnov distance of 10^4)."""
    assert counter_uniform(7, 3) == counter_uniform(7, 3) != counter_uniform(7, 4) != counter_uniform(8, 3)
    u = np.sort([counter_uniform(12345, t) for t in range(10_000)])
    assert 0 <= u[0] and u[-1] < 1
    ks = np.max(np.abs(u - (np.arange(1, u.size + 1) / u.size)))
    assert ks < 1.63 / np.sqrt(u.size)  # the 1% critical value


@pytest.fixture(scope="module", params=[False, True], ids=["default", "top_p_search"])
def cuda_source(request, tmp_path_factory) -> str:
    """The sampler built for CUDA sm_90 with nvcc (as compile/build.py builds it), as TVM's generated CUDA source:
    the default build, and the one with the multi-block top-p search (VPTQ_MLC_SAMPLER_TOP_P_SEARCH=1)."""
    from tvm import relax

    from vptq_mlc.compile.cuda import find_nvcc
    from vptq_mlc.compile.sampler import add_sampler
    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.errors import VPTQMLCError

    try:
        find_nvcc()
    except VPTQMLCError as e:
        missing(str(e))
    out = tmp_path_factory.mktemp("cuda_sampler")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VPTQ_MLC_CUDA_DUMP", str(out / "sampler.cu"))  # the compile callback keeps the source
        bt = resolve_backend("cuda", "sm_90")[0]
        bt.prepare()
        with bt.target:
            mod = bt.relax_pipeline()(add_sampler(tvm.IRModule(), bt.target, top_p_search=request.param))
        relax.build(mod, bt.target, relax_pipeline=None).export_library(str(out / "sampler.so"))
    assert (out / "sampler.so").stat().st_size > 0
    return (out / "sampler.cu").read_text()


def test_gpu_kernel_builds_for_cuda(cuda_source: str) -> None:
    """The GPU sampler passes TVM's CUDA lowering (shared-memory sync planning) and nvcc: the full-vocabulary
    scores and compaction kernels (and, with the top-p search, its pass kernel, launched once per pass) over several
    blocks per row (grid y = row, x = vocabulary slice), then one block per row; no atomics, so its sums are
    deterministic. It runs in tests/gpu/test_device_sampler_gpu.py."""
    from vptq_mlc.compile.sampler import GPU_THREADS, SPLIT_THREADS

    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\([^)]*\) \{', cuda_source)
    search = "search_i_ptr" in cuda_source
    want = [SPLIT_THREADS, SPLIT_THREADS] + [GPU_THREADS] * (2 if search else 1)
    assert [int(n) for n, _ in kernels] == want, kernels
    bodies = re.split(r'extern "C" __global__ void __launch_bounds__\(\d+\) \w+\([^)]*\) \{', cuda_source)[1:]
    assert all("blockIdx.y" in b for b in bodies[:-1]) and "blockIdx.y" not in bodies[-1]
    assert "atomic" not in cuda_source


def test_gpu_kernel_emulated_on_cpu(cuda_source: str, tmp_path) -> None:
    """The generated CUDA kernels, run on the CPU (tests/cuda_emulator.py), against the numpy reference with the
    same uniforms: the vocabulary limit and batch independence at 500 tokens (one candidate per thread), every
    setting at 3000 (a few candidates per thread after compaction, or the key search over all tokens for top-k),
    and a 128256-token vocabulary with peaked and flat logits (compaction over 64 blocks per row, then the direct
    ranking, the key search over the candidates, or, for the flat logits at top_p 0.9, the multi-block top-p
    search over ~20,000 of them). The tied-logits check runs on the GPU only (each emulated launch is slow)."""
    import shutil

    from cuda_emulator import EmulatedSampler

    if not (shutil.which("g++") or shutil.which("c++")):
        missing("a C++20 compiler (g++) runs the CUDA kernels on the CPU; install g++")
    sampler = checks.DeviceSampler(EmulatedSampler(cuda_source, tmp_path), tvm.cpu())
    checks.check_vocab_limit_and_batch_independence(sampler, 500)
    checks.check_degenerate_rows(sampler, 500)  # one candidate per thread
    checks.check_degenerate_rows(sampler, 3000)  # the key search over all tokens
    checks.check_settings_same_uniform(sampler, 3000, uniforms=4)
    checks.check_profiles_same_uniform(sampler, 128256, rows=1, settings=checks.PROFILE_SETTINGS[:2])


def test_top_p_search_switch(monkeypatch) -> None:
    """VPTQ_MLC_SAMPLER_TOP_P_SEARCH: 1 / 0 / unset (the default: off until the search has run on a GPU); anything
    else is a one-line error naming the variable."""
    from vptq_mlc.compile import sampler as compiled
    from vptq_mlc.errors import CompileError

    for value, want in (("1", True), ("0", False), (None, compiled.TOP_P_SEARCH_DEFAULT)):
        if value is None:
            monkeypatch.delenv(compiled.TOP_P_SEARCH_ENV, raising=False)
        else:
            monkeypatch.setenv(compiled.TOP_P_SEARCH_ENV, value)
        assert compiled.top_p_search_enabled() is want
    monkeypatch.setenv(compiled.TOP_P_SEARCH_ENV, "yes")
    with pytest.raises(CompileError, match=compiled.TOP_P_SEARCH_ENV):
        compiled.top_p_search_enabled()


def test_tied_logits_keep_tie_groups(sampler: checks.DeviceSampler) -> None:
    checks.check_tied_logits_same_uniform(sampler, 128256, rows=2, uniforms=2)


def test_rows_change_hands(sampler: checks.DeviceSampler) -> None:
    checks.check_rows_change_hands(sampler)


def test_packer_matches_pack_rows() -> None:
    checks.check_packer_matches_pack_rows()


def test_penalty_lists_follow_the_request(tmp_path) -> None:
    """The penalty lists a request hands the device sampler at each step: every seen token with its generated count
    (repetition penalty), or the generated tokens with theirs (presence / frequency only), counted here from the
    prompt and the tokens appended so far, whatever order the request keeps them in."""
    from vptq_mlc.runtime.request import Request
    from vptq_mlc.runtime.tokenizer import Tokenizer
    from vptq_mlc.testing.synthetic import synthetic_tokenizer_json

    (tmp_path / "tokenizer.json").write_text(synthetic_tokenizer_json(512))
    tokenizer = Tokenizer(tmp_path)
    rng = np.random.default_rng(2)
    prompt = [int(t) for t in rng.integers(0, 60, 40)]
    for kw in (dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(frequency_penalty=0.3),
               dict(repetition_penalty=0.9, frequency_penalty=-0.4), {}):
        req = Request(prompt, SamplingParams(temperature=0.8, max_tokens=100, **kw), frozenset(), 100,
                      tokenizer.stream())
        generated: list[int] = []
        for step in range(30):
            row = req.sample_row(512)
            seen = prompt + generated if "repetition_penalty" in kw else generated if kw else []
            want = {t: generated.count(t) for t in seen}
            got = {} if row.penalty_tokens is None else dict(zip(row.penalty_tokens.tolist(),
                                                                 row.penalty_counts.tolist()))
            assert got == want and (row.penalty_tokens is None or row.penalty_tokens.size == len(want)), (kw, step)
            token = int(rng.integers(30, 90))  # half of them also in the prompt
            req.append(token)
            generated.append(token)


def test_bad_switch_value_is_one_line_error(tmp_path, monkeypatch) -> None:
    """A bench tool reading the switch while compiling: `error: ...` naming the variable, no traceback, no file."""
    from click.testing import CliRunner

    from vptq_mlc.cli import main
    from vptq_mlc.compile.sampler import TOP_P_SEARCH_ENV

    monkeypatch.setenv(TOP_P_SEARCH_ENV, "yes")
    out = tmp_path / "sampler.so"
    r = CliRunner().invoke(main, ["bench", "sampler", "--build", str(out), "--device", "cuda", "--arch", "sm_90"])
    assert r.exit_code == 1
    want = f"error: {TOP_P_SEARCH_ENV}='yes': set it to 1 (the multi-block top-p search) or 0 (off)"
    assert r.output.strip() == want
    assert "Traceback" not in r.output and not out.exists()


VOCAB_FUZZ = 64
_request_params = st.builds(
    lambda **kw: SamplingParams(**kw),
    temperature=st.floats(0, 2), top_p=st.floats(0, 1, exclude_min=True), top_k=st.integers(0, VOCAB_FUZZ + 4),
    min_p=st.floats(0, 1), repetition_penalty=st.floats(*REPETITION_PENALTY_RANGE),
    presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
    logit_bias=st.dictionaries(st.integers(0, VOCAB_FUZZ + 8), st.floats(-100, 100), max_size=4),
    logprobs=st.booleans(), top_logprobs=st.integers(0, 20))


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(_request_params, st.floats(0, 1, exclude_max=True), st.sampled_from(["none", "some",
                                                                                                    "nothing"])),
                     min_size=1, max_size=4),
       scale=st.sampled_from([0.0, 1.0, 30.0, 1e4]), seed=st.integers(0, 2**32 - 1))
def test_any_valid_request_gets_a_token_of_the_vocabulary(sampler: checks.DeviceSampler, rows, scale, seed) -> None:
    """Whatever valid parameters a request carries (each field over its whole range, logits from flat to 1e4
    wide, a constraint allowing some tokens or none): every row gets a token inside the vocabulary, the greedy
    rows the reference's argmax (runtime/sampling.py, float64; a token within float32 rounding of it, where the
    device's float32 scores tie), and a finite logprob for a token its scores keep."""
    logits = (np.random.default_rng(seed).standard_normal((len(rows), VOCAB_FUZZ)) * scale).astype(np.float32)
    masks = {"none": None, "some": checks.bitmask_for(checks.MASK_ALLOWED, VOCAB_FUZZ),
             "nothing": np.zeros((VOCAB_FUZZ + 31) // 32, dtype=np.int32)}
    packed = [checks.row_for(p, True, masks[m], u) for p, u, m in rows]
    out = sampler.sample(tvm.runtime.tensor(logits, sampler.device), packed)
    for (params, _, mask), row, (token, lp) in zip(rows, logits, out):
        assert 0 <= token < VOCAB_FUZZ
        scores = penalized_scores(row, params, np.concatenate([checks.PROMPT, checks.GENERATED]), checks.GENERATED,
                                  masks[mask])
        if params.temperature == 0:  # the argmax, up to float32 rounding of the scores (a tie there)
            best = scores.max()
            assert scores[token] >= best - 1e-6 * max(1.0, abs(best)), (params, token, np.argmax(scores))
        if params.logprobs:
            assert lp is not None and all(0 <= t < VOCAB_FUZZ for t, _ in lp.top)
            if np.isfinite(scores[token]):
                assert np.isfinite(lp.logprob)
