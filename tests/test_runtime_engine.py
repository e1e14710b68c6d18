"""runtime/engine.py on the real path: synthetic VPTQ checkpoint -> convert -> compile (llvm) -> Engine.

Greedy tokens are checked against transformers holding the dense dequantized weights (tests/reference_model.py);
batching, chunked prefill, admission and cancellation are checked against the same engine running each request
alone and unchunked, and KV pages are counted with `attention_kv_cache_get_num_available_pages`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from reference_model import reference_greedy, reference_model

from vptq_mlc.compile.build import compile_model
from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.errors import GenerationError, RuntimeLoadError
from vptq_mlc.runtime import Engine, SamplingParams
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

PROMPTS = ["The quick brown fox", "Hello there, how are you doing today? I am", "A"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("engine")
    ckpt = make_synthetic_checkpoint(root / "ckpt", arch="llama", variant="v8-k256-0", dtype="float32", seed=3)
    model_dir = convert_checkpoint(ckpt, root / "mlc", context_window_size=96, prefill_chunk_size=32, max_batch_size=4)
    (lib,) = compile_model(model_dir, "llvm")
    return ckpt, model_dir, lib


@pytest.fixture(scope="module")
def engine(built: tuple[Path, Path, Path]) -> Engine:
    return Engine(built[1], device="cpu")  # library found in the model dir by name


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(engine: Engine, reqs: list) -> None:
    while any(not r.finished for r in reqs):
        engine.step()


def alone(engine: Engine, prompt: str, params: SamplingParams) -> list[int]:
    req = engine.add_request(prompt, params)
    run(engine, [req])
    return req.output_ids


def test_greedy_matches_transformers(built: tuple[Path, Path, Path], engine: Engine) -> None:
    ref = reference_model(built[0])
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        assert alone(engine, prompt, greedy()) == reference_greedy(ref, ids, 12)


def test_batch_equals_alone_and_pages_freed(engine: Engine) -> None:
    solo = [alone(engine, p, greedy()) for p in PROMPTS]
    total = engine.kv.total_pages
    assert engine.kv.available_pages() == total
    reqs = [engine.add_request(p, greedy()) for p in PROMPTS]
    assert engine.step() == [reqs[0]]  # one prefill call packs prompt 0 and the start of prompt 1 (chunk 32)
    assert reqs[0].prefill_done and 0 < reqs[1].prefilled < len(reqs[1].prompt_ids)
    assert engine.kv.available_pages() < total
    run(engine, reqs)
    assert [r.output_ids for r in reqs] == solo
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.kv.available_pages() == total and engine.kv.total_tokens() == 0


def test_continuous_batching_late_arrival(engine: Engine) -> None:
    solo = [alone(engine, p, greedy(10)) for p in PROMPTS[:2]]
    first = engine.add_request(PROMPTS[0], greedy(10))
    for _ in range(4):
        engine.step()
    second = engine.add_request(PROMPTS[1], greedy(10))  # joins while `first` is decoding
    run(engine, [first, second])
    assert [first.output_ids, second.output_ids] == solo


def test_engine_takes_the_librarys_longer_prefill_chunk(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A library built for longer prefill calls than its model dir says (CUDA builds raise the chunk) runs them:
    the model dir below asks for 8 tokens, the library was compiled for 32; an explicit size still wins."""
    import json
    import shutil

    from vptq_mlc.compile.build import library_prefill_chunk
    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.errors import CompileError

    small = tmp_path / "mlc"
    shutil.copytree(built[1], small)
    cfg_path = small / "mlc-chat-config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prefill_chunk_size"] = 8
    cfg_path.write_text(json.dumps(cfg))
    assert Engine(small, built[2]).prefill_chunk == 32
    assert Engine(small, built[2], prefill_chunk_size=7).prefill_chunk == 7
    (cuda,) = resolve_backend("cuda", "sm_90")
    assert library_prefill_chunk(512, 4096, cuda) == 512 + max(0, cuda.default_prefill_chunk - 512)
    assert library_prefill_chunk(512, 4096, cuda, 2048) == 2048 and library_prefill_chunk(512, 1024, cuda, 2048) == 1024
    with pytest.raises(CompileError, match="positive"):
        library_prefill_chunk(512, 4096, cuda, 0)


def test_chunked_prefill_equals_unchunked(built: tuple[Path, Path, Path], engine: Engine) -> None:
    prompt = " ".join(PROMPTS)  # 43 tokens: 7 chunks of 7
    assert len(engine.tokenizer.encode(prompt)) > 20
    want = alone(engine, prompt, greedy())
    chunked = Engine(built[1], built[2], prefill_chunk_size=7)
    assert chunked.prefill_chunk == 7
    assert alone(chunked, prompt, greedy()) == want
    reqs = [chunked.add_request(p, greedy()) for p in [prompt, PROMPTS[0]]]  # chunks spanning two requests
    run(chunked, reqs)
    assert reqs[0].output_ids == want and reqs[1].output_ids == alone(engine, PROMPTS[0], greedy())


def _long_prompt_during_decoding(eng: Engine, long_ids: list[int]) -> tuple[list, list[list], list[list[int]]]:
    """Two requests decode, then a long prompt arrives. Returns the three requests, who got a token in each step
    until the long prompt's first token, and the token counts of those steps' model calls (read at begin_forward)."""
    calls: list[list[int]] = []
    forward = eng.kv.forward
    eng.kv.forward = lambda seq_ids, lengths: (calls.append(list(lengths)), forward(seq_ids, lengths))[1]
    shorts = [eng.add_request(p, greedy(30)) for p in (PROMPTS[0], PROMPTS[2])]
    while not all(r.output_ids for r in shorts):
        eng.step()
    long = eng.add_request(long_ids, greedy(8))
    during, first_call = [], len(calls)
    while not long.output_ids:
        during.append(eng.step())
    long_calls = calls[first_call:]
    run(eng, [*shorts, long])
    del eng.kv.forward
    assert all(sum(c) <= eng.prefill_chunk for c in calls), calls
    return [*shorts, long], during, long_calls


def test_decode_steps_carry_prompt_chunks(built: tuple[Path, Path, Path]) -> None:
    """With a step token budget, a long prompt is prefilled a few tokens per step inside the running requests'
    decode steps (each of them gets a token every step); the tokens equal transformers' and the unmixed engine's."""
    long_ids = [(7 * i + 3) % 500 + 5 for i in range(60)]
    mixed = Engine(built[1], built[2], step_token_budget=8, max_total_tokens=256)
    assert mixed.step_token_budget == 8
    reqs, during, calls = _long_prompt_during_decoding(mixed, long_ids)
    assert len(during) == 10  # 60 prompt tokens, 8 - 2 decode tokens = 6 per step
    assert all(reqs[0] in got and reqs[1] in got for got in during)
    assert during[-1][-1] is reqs[2]
    assert calls == [[1, 1, 6]] * 10  # the two decode tokens, then the prompt up to the budget

    paused = Engine(built[1], built[2], step_token_budget=0, max_total_tokens=256)
    ref_reqs, ref_during, ref_calls = _long_prompt_during_decoding(paused, long_ids)
    assert len(ref_during) == 2 and ref_during[0] == []  # 60 tokens in chunks of 32; nobody decodes meanwhile
    assert ref_calls == [[32], [28]]
    assert [r.output_ids for r in reqs] == [r.output_ids for r in ref_reqs]

    ref = reference_model(built[0])
    for r in reqs:
        assert r.output_ids == reference_greedy(ref, r.prompt_ids, len(r.output_ids))


def test_admission_waits_for_pages(built: tuple[Path, Path, Path], engine: Engine) -> None:
    small = Engine(built[1], built[2], max_total_tokens=32)  # room for one 12-token prompt + 12 new at a time
    reqs = [small.add_request(p, greedy()) for p in PROMPTS[:2]]
    small.step()
    assert reqs[0].seq_id is not None and reqs[1].seq_id is None  # second one waits
    run(small, reqs)
    assert [r.output_ids for r in reqs] == [alone(engine, p, greedy()) for p in PROMPTS[:2]]
    with pytest.raises(GenerationError, match="KV tokens"):
        small.add_request(PROMPTS[1], greedy(60))


def test_streaming_stop_and_cancel(engine: Engine) -> None:
    full = engine.generate(PROMPTS[0], max_tokens=16, temperature=0)
    deltas = list(engine.generate(PROMPTS[0], max_tokens=16, temperature=0, stream=True))
    assert "".join(deltas) == full and len(deltas) > 1
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert engine.generate(PROMPTS[0], max_tokens=16, temperature=0, stop=stop) == full[: full.index(stop)]
    ids = alone(engine, PROMPTS[0], greedy(16))
    req = engine.add_request(PROMPTS[0], greedy(16, stop_token_ids=[ids[3]]))
    run(engine, [req])
    assert req.finish_reason == "stop" and req.output_ids == ids[: ids.index(ids[3])]
    it = engine.generate(PROMPTS[1], max_tokens=50, temperature=0, stream=True)
    next(it)
    assert engine.kv.available_pages() < engine.kv.total_pages
    it.close()  # the caller stops early: the request is cancelled and its pages come back
    assert engine.kv.available_pages() == engine.kv.total_pages and not engine.has_unfinished()


def test_seeded_sampling_reproducible_in_any_batch(engine: Engine) -> None:
    params = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    a = alone(engine, PROMPTS[0], SamplingParams(seed=5, **params))
    reqs = [engine.add_request(PROMPTS[1], SamplingParams(seed=9, **params)),
            engine.add_request(PROMPTS[0], SamplingParams(seed=5, **params))]
    run(engine, reqs)
    assert reqs[1].output_ids == a


class AllowOnly:
    """A token constraint allowing a fixed set of tokens at every step (bitmask in xgrammar's layout)."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def fill_bitmask(self, bitmask) -> None:
        bits = np.zeros(bitmask.size * 32, dtype=np.uint8)
        bits[self.allowed] = 1
        bitmask[:] = np.packbits(bits, bitorder="little").view("<i4")

    def accept(self, token: int) -> None:
        pass

    def is_terminated(self) -> bool:
        return False


def test_device_sampler_end_to_end(engine: Engine) -> None:
    """The compiled library samples on the device, with the host path's greedy tokens and logprobs; seeded requests
    repeat; constraints, logit_bias and penalties reach the kernel."""
    assert engine.device_sampler is not None
    params = dict(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)

    def both(prompt, constraint=None, **kw) -> list[tuple[list[int], list]]:
        out = []
        for device in (True, False):
            saved, engine.device_sampler = engine.device_sampler, engine.device_sampler if device else None
            try:
                req = engine.add_request(prompt, SamplingParams(**{**params, **kw}), constraint=constraint)
                run(engine, [req])
            finally:
                engine.device_sampler = saved
            out.append((req.output_ids, req.output_logprobs))
        return out

    for prompt, kw in [(PROMPTS[1], {}), (PROMPTS[0], dict(repetition_penalty=1.5, frequency_penalty=0.7,
                                                              logit_bias={7: 5.0}))]:
        (dev_ids, dev_lp), (host_ids, host_lp) = both(prompt, **kw)
        assert dev_ids == host_ids
        for d, h in zip(dev_lp, host_lp):
            assert d.token == h.token and abs(d.logprob - h.logprob) <= 1e-4
            assert [t for t, _ in d.top] == [t for t, _ in h.top]
            np.testing.assert_allclose([v for _, v in d.top], [v for _, v in h.top], atol=1e-4)
    allowed = [11, 40, 300]
    (dev_ids, _), (host_ids, _) = both(PROMPTS[2], AllowOnly(allowed), temperature=1.0, seed=3)
    assert set(dev_ids) <= set(allowed) and set(host_ids) <= set(allowed)
    sampled = dict(max_tokens=10, temperature=0.8, top_p=0.9, ignore_eos=True)
    assert alone(engine, PROMPTS[0], SamplingParams(seed=21, **sampled)) == \
        alone(engine, PROMPTS[0], SamplingParams(seed=21, **sampled))


def test_device_sampler_rows_change_hands(engine: Engine) -> None:
    """A finished request's batch row goes to the next request, which samples with its own parameters: the host
    (numpy) sampler's tokens for it alone, not the finished one's logit_bias."""
    biased = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logit_bias={7: 100.0})
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
    saved, engine.device_sampler = engine.device_sampler, None
    try:
        want_long, want_plain = alone(engine, PROMPTS[0], long), alone(engine, PROMPTS[2], plain)
    finally:
        engine.device_sampler = saved
    first = engine.add_request(PROMPTS[0], long)
    second = engine.add_request(PROMPTS[1], biased)  # row 1 of the batch
    run(engine, [second])
    assert second.output_ids == [7, 7] and not first.finished
    third = engine.add_request(PROMPTS[2], plain)  # takes row 1
    run(engine, [first, third])
    assert first.output_ids == want_long and third.output_ids == want_plain


def test_context_window_limits(engine: Engine) -> None:
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.add_request([5, 512], greedy())
    with pytest.raises(GenerationError, match="context window is 96"):
        engine.add_request(list(range(5, 101)), greedy())
    req = engine.add_request(list(range(5, 90)), greedy(50))
    run(engine, [req])
    assert req.finish_reason == "length" and len(req.output_ids) == 96 - 85


def test_chat_and_reset(engine: Engine) -> None:
    msgs = [{"role": "user", "content": "Hi!"}]
    want = engine.tokenizer.encode(engine.chat_template.render(msgs), add_special_tokens=False)
    assert engine.render_chat(msgs) == want
    assert isinstance(engine.chat(msgs, max_tokens=4, temperature=0), str)
    engine.add_request(PROMPTS[0], greedy())
    engine.step()
    engine.reset()
    assert not engine.has_unfinished() and engine.kv.available_pages() == engine.kv.total_pages


def test_load_errors(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, model_dir, lib = built
    with pytest.raises(RuntimeLoadError, match="model library not found"):
        Engine(model_dir, tmp_path / "nope.so")
    with pytest.raises(RuntimeLoadError, match="larger than the library was compiled for"):
        Engine(model_dir, lib, context_window=4096)
    with pytest.raises(RuntimeLoadError, match="step token budget -1 is negative"):
        Engine(model_dir, lib, step_token_budget=-1)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".so":
            (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RuntimeLoadError, match="no cpu model library"):
        Engine(bad)
    index = json.loads((bad / "tensor-cache.json").read_text())
    rec = index["records"][0]["records"][0]
    rec["shape"] = rec["shape"][::-1]  # same bytes (a consistent record), not the shape the library declares
    assert rec["shape"] != rec["shape"][::-1]
    (bad / "tensor-cache.json").write_text(json.dumps(index))
    with pytest.raises(RuntimeLoadError, match=f"weight {rec['name']} is"):
        Engine(bad, lib)
    (bad / "params_shard_0.bin").unlink()
    with pytest.raises(RuntimeLoadError, match="params_shard_0.bin missing"):
        Engine(bad, lib)


def test_runtime_imports_only_tvm_runtime(built: tuple[Path, Path, Path]) -> None:
    """In a runtime-only process with torch/transformers/tvm.relax blocked, the engine loads and generates."""
    code = textwrap.dedent(f"""
        import sys
        BLOCKED = ("torch", "transformers", "tvm.relax", "safetensors", "vptq_mlc.compile", "vptq_mlc.model")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError("blocked for the test: " + name)
        sys.meta_path.insert(0, Block())
        from vptq_mlc.runtime import Engine
        import tvm
        assert tvm.base._RUNTIME_ONLY
        e = Engine({str(built[1])!r}, {str(built[2])!r})
        print(repr(e.generate("The quick", max_tokens=4, temperature=0)))
        bad = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
        assert not bad, bad
    """)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]


# ---- chat session + CLI (same built model) ----------------------------------------------------------


def test_chat_session_keeps_history(engine: Engine) -> None:
    from vptq_mlc.runtime.chat_session import ChatSession

    s = ChatSession(engine, system="Be brief.", max_tokens=6, temperature=0.0)
    first = "".join(s.send("Hi"))
    assert s.messages[-1] == {"role": "assistant", "content": first} and len(s.messages) == 3
    second = "".join(s.send("More"))
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": first}, {"role": "user", "content": "More"}]
    assert second == engine.chat(convo, max_tokens=6, temperature=0.0)
    s.reset()
    assert s.messages == [{"role": "system", "content": "Be brief."}]


def test_cli_chat(built: tuple[Path, Path, Path], engine: Engine) -> None:
    from click.testing import CliRunner

    from vptq_mlc.cli import main

    model_dir = str(built[1])
    r = CliRunner().invoke(main, ["chat", model_dir, "--device", "cpu", "--prompt", "Hi", "--max-tokens", "8",
                                  "--temperature", "0"])
    assert r.exit_code == 0, r.output
    assert r.stdout == engine.chat([{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0) + "\n"
    r = CliRunner().invoke(main, ["chat", model_dir, "--lib", str(built[2]), "--raw", "--prompt", "The quick",
                                  "--max-tokens", "8", "--temperature", "0"])
    assert r.stdout == engine.generate("The quick", max_tokens=8, temperature=0) + "\n"
    r = CliRunner().invoke(main, ["chat", model_dir, "--max-tokens", "4", "--temperature", "0"],
                           input="Hi\n/reset\nHi\n/exit\nnot read\n")
    assert r.exit_code == 0
    reply = engine.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert r.stdout.count(reply) >= 2 and "(conversation cleared)" in r.stderr  # same reply after /reset
    r = CliRunner().invoke(main, ["chat", model_dir, "--device", "tpu", "--prompt", "x"])
    assert r.exit_code == 1 and r.stderr.startswith("error: unknown device")
