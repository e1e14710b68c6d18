"""Layer split across devices (issue 11 item 2) on CPU: TVM's runtime accepts `cpu:1` as a second device (its own
VM instance, tensors and KV cache there), so the split runs on devices cpu:0,cpu:1 as it would on cuda:0,cuda:1.

Synthetic 3-layer llama with tied embeddings (the head needs the embedding on the last device too) -> convert ->
compile llvm with `--split-functions` (static decode batch 2, so decode, batch_decode_b2 and batch_decode all
have split counterparts). Greedy tokens are checked against transformers on the dense dequantized weights
(tests/reference_model.py) and against the single-device run of the same library; logits of every function must be
bitwise identical to the single-device ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tvm
from click.testing import CliRunner
from reference_model import reference_greedy, reference_model
from tvm.runtime import ShapeTuple

import vptq_mlc.runtime.device as device_module
from vptq_mlc.cli import main
from vptq_mlc.compile.build import compile_model
from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime.device import parse_devices
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.kv_cache import PagedKVCache
from vptq_mlc.runtime.library import CompiledModel, load_library, load_params
from vptq_mlc.runtime.sampling import SamplingParams
from vptq_mlc.runtime.split import SplitModel, StagedKVCache, plan_stages
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

DEVICES = "cpu:0,cpu:1"
PROMPTS = ["The quick brown fox", "Hello there, how are you doing today? I am", "A"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("split")
    ckpt = make_synthetic_checkpoint(root / "ckpt", arch="llama", variant="v8-k256-16", num_layers=3,
                                     tie_word_embeddings=True, dtype="float32", seed=5)
    model_dir = convert_checkpoint(ckpt, root / "mlc", context_window_size=96, prefill_chunk_size=32, max_batch_size=4)
    (lib,) = compile_model(model_dir, "llvm", model_dir / "tiny-llvm.so", static_batches=(2,), split_functions=True)
    return ckpt, model_dir, lib


@pytest.fixture(scope="module")
def single(built: tuple[Path, Path, Path]) -> Engine:
    return Engine(built[1], built[2], device="cpu", max_batch_size=4)


@pytest.fixture(scope="module")
def split(built: tuple[Path, Path, Path]) -> Engine:
    return Engine(built[1], built[2], devices=DEVICES, max_batch_size=4)


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def generate(engine: Engine, prompts: list[str], n: int = 12) -> list[list[int]]:
    reqs = [engine.add_request(p, greedy(n)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def test_stages_live_on_their_devices(split: Engine, single: Engine) -> None:
    model = split.lib
    assert isinstance(model, SplitModel) and isinstance(split.kv, StagedKVCache)
    assert isinstance(model, CompiledModel) and isinstance(single.lib, CompiledModel)  # one protocol, two models
    assert split.device_sampler is None  # layer-split models sample on the host
    s0, s1 = model.stages
    assert (s0.layers, s1.layers) == (range(0, 2), range(2, 3))  # embed on stage 0 balances against layers there
    assert [st.lib.device.index for st in model.stages] == [0, 1]
    assert all(t.device.index == 0 for i in s0.layers for t in s0.layer_params[i])
    assert all(t.device.index == 1 for t in [*s1.layer_params[2], *s1.head_params])
    assert set(s1.layer_params) == {2} and s0.head_params is None and s1.embed_params is None
    # stage 1's cache holds only layer 2: layer 0's attention is refused there
    fn = s1.lib.vm[model.split["layer_groups"][0]["decode_static"]["1"]]
    split.kv.add(99)
    try:
        with split.kv.forward([99], [1]) as kvs:
            hidden = tvm.runtime.tensor(np.zeros((1, 1, 64), "float32"), s1.lib.device)
            with pytest.raises(Exception, match="local_layer_id"):
                fn(hidden, kvs[1], ShapeTuple([0]), s1.layer_params[2])
    finally:
        split.kv.remove(99)


def test_greedy_matches_transformers_and_single_device(built, single: Engine, split: Engine) -> None:
    ref = reference_model(built[0])
    for prompt in PROMPTS:
        ids = split.tokenizer.encode(prompt)
        want = reference_greedy(ref, ids, 12)
        assert generate(split, [prompt]) == [want]
        assert generate(single, [prompt]) == [want]
    # batched: packed prefill, then decode batches of 3 = static 2 + 1 on both
    assert generate(split, PROMPTS) == generate(single, PROMPTS)
    assert split.kv.available_pages() == split.kv.total_pages and split.kv.total_tokens() == 0


def test_every_function_gives_identical_logits(built) -> None:
    """batch_prefill, batch_decode (symbolic batch), batch_decode_b2 and decode: bitwise equal logits."""
    _, model_dir, lib_path = built
    lib = load_library(lib_path, "cpu")
    params = load_params(model_dir, lib)
    split = SplitModel(lib_path, parse_devices(DEVICES))
    split.load_params(model_dir)
    caches = [PagedKVCache(lib, 4, 96, 32), StagedKVCache(split, 4, 96, 32)]
    reshape = tvm.get_global_func("vm.builtin.reshape")
    prompts = [[3, 17, 250, 9, 41], [8, 8, 100, 7, 300, 12, 5]]
    results: list[list[np.ndarray]] = [[], []]
    for k, (m, kv) in enumerate([(lib, caches[0]), (split, caches[1])]):
        prm = params if m is lib else None

        def emb(ids: list[int], shape: list[int]) -> object:
            e = m.func("embed")(tvm.runtime.tensor(np.asarray(ids, np.int32), m.device), prm)
            return reshape(e, ShapeTuple([*shape, 64]))

        kv.add(0), kv.add(1)
        pos = tvm.runtime.tensor(np.array([4, 11], np.int32), m.device)
        with kv.forward([0, 1], [5, 7]) as c:
            results[k].append(m.func("batch_prefill")(emb(prompts[0] + prompts[1], [1, 12]), pos, c, prm)[0].numpy())
        for name, seqs in [("batch_decode", [0, 1]), ("batch_decode_b2", [0, 1]), ("decode", [1])]:
            with kv.forward(seqs, [1] * len(seqs)) as c:
                out = m.func(name)(emb([20 + s for s in seqs], [len(seqs), 1]), c, prm)
                results[k].append(out[0].numpy())
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_plan_stages_balances_bytes() -> None:
    assert plan_stages([10] * 6, 2, first_extra=30, last_extra=30) == [range(0, 3), range(3, 6)]
    assert plan_stages([10] * 6, 2, first_extra=20) == [range(0, 2), range(2, 6)]
    assert plan_stages([10, 10, 40, 10], 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert plan_stages([5], 1) == [range(0, 1)]
    with pytest.raises(RuntimeLoadError, match="3 devices but the model has 2 decoder layers"):
        plan_stages([1, 1], 3)


def test_cli_chat_devices(built, monkeypatch) -> None:
    _, model_dir, lib = built
    args = ["chat", str(model_dir), "--lib", str(lib), "--raw", "--prompt", "The quick", "--max-tokens", "8",
            "--temperature", "0"]
    one = CliRunner().invoke(main, [*args, "--device", "cpu"])
    parsed = []
    real = device_module.parse_device
    monkeypatch.setattr(device_module, "parse_device", lambda text: parsed.append(text) or real(text))
    two = CliRunner().invoke(main, [*args, "--devices", DEVICES])
    assert one.exit_code == 0 and two.exit_code == 0, (one.output, two.output)
    assert two.stdout == one.stdout and one.stdout.strip()
    assert parsed == DEVICES.split(",")  # each listed device parsed once, at the CLI; the split gets DeviceSpecs


@pytest.mark.parametrize("devices, message", [
    ("gpu:0,cpu:1", "unknown device 'gpu:0'"),
    ("cpu:0,auto", "explicit devices"),
    ("cpu:0,cpu:1,cpu:2,cpu:3", "4 devices but the model has 3 decoder layers; use at most 3"),
])
def test_cli_bad_devices(built, devices: str, message: str) -> None:
    _, model_dir, lib = built
    r = CliRunner().invoke(main, ["chat", str(model_dir), "--lib", str(lib), "--prompt", "x", "--devices", devices])
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_library_without_split_functions(tiny_served_model) -> None:
    _, model_dir, lib = tiny_served_model
    r = CliRunner().invoke(main, ["chat", str(model_dir), "--lib", str(lib), "--prompt", "x", "--devices", DEVICES])
    assert r.exit_code == 1 and "--split-functions" in r.output, r.output


def test_cuda_graph_refused_with_split_functions(built, tmp_path) -> None:
    """RewriteCUDAGraph treats packed params as static: a layer-group function replayed from a graph captured
    with another layer's weights would be silently wrong, so compile refuses the pair (before any work)."""
    _, model_dir, _ = built
    r = CliRunner().invoke(main, ["compile", str(model_dir), "--target", "cuda", "--split-functions",
                                  "--cuda-graph", "-o", str(tmp_path / "x.so")])
    assert r.exit_code == 1 and "--split-functions" in r.output and not (tmp_path / "x.so").exists(), r.output


def test_random_weights_made_on_each_stage_device(built, tmp_path, monkeypatch) -> None:
    """The 405B benchmark's loading path (bench/device_random.py: use_random_weights_on_device): a config-only dir (no
    shards at all) gives a working split engine whose tensors were made on their stage's device, with codes inside
    their codebooks and perms that are permutations. SMALL/BLOCK are shrunk so the tiled-copy path runs too."""
    import json
    import shutil

    from vptq_mlc.bench import device_random
    from vptq_mlc.runtime import split

    _, model_dir, lib = built
    for f in model_dir.iterdir():
        if f.suffix == ".json" and f.name != "tensor-cache.json":
            shutil.copy2(f, tmp_path / f.name)
    monkeypatch.setattr(split, "_weight_source", None)  # undone after the test, like the env var it replaced
    device_random.use_random_weights_on_device(seed=7)
    monkeypatch.setattr(device_random, "SMALL", 100)
    monkeypatch.setattr(device_random, "BLOCK", 97)
    engine = Engine(tmp_path, lib, devices=DEVICES, max_batch_size=4)
    model = engine.lib
    meta = {p["name"]: p for p in model.metadata["params"]}
    vptq = json.loads((tmp_path / "mlc-chat-config.json").read_text())["vptq"]["layers"]
    codebook = {"codes": lambda c: c["num_centroids"][-1], "res_codes": lambda c: c["num_res_centroids"][-1],
                "outlier_codes": lambda c: c["num_centroids"][0]}
    seen = set()
    for k, st in enumerate(model.stages):
        named = {n: t for i in st.layers for n, t in zip(model.layer_param_names(i), st.layer_params[i])}
        if st.embed_params is not None:
            named.update(zip(model.split["embed"]["params"], st.embed_params))
        if st.head_params is not None:
            named.update(zip(model.split["head"]["params"], st.head_params))
        for name, t in named.items():
            assert t.device.index == k and list(t.shape) == meta[name]["shape"] and str(t.dtype) == meta[name]["dtype"]
            a = t.numpy()
            path, _, leaf = name.rpartition(".")
            if leaf in codebook:
                assert 0 <= a.min() and a.max() < codebook[leaf](vptq[path]), name
            elif leaf == "perm":
                assert sorted(a.tolist()) == list(range(a.size)), name
            else:
                assert np.isfinite(a).all() and np.abs(a).max() < 2, name
            if a.size > 100 and leaf != "perm":  # tiled: every element repeats the block of 97
                flat = a.reshape(-1)
                assert np.array_equal(flat[97:], flat[: flat.size - 97]) and len(np.unique(flat[:97])) > 1, name
            seen.add(name)
    assert seen == set(meta)
    assert model.stages[0].embed_params is not None and model.stages[1].head_params is not None
    out = generate(engine, ["The quick brown fox", "A"], 6)
    assert [len(o) for o in out] == [6, 6] and all(0 <= t < engine.vocab_size for o in out for t in o)
