"""Reader, validator, writer and synthetic checkpoints: round trips, config shapes, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from required import import_required
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.reader import VPTQCheckpoint
from vptq_mlc.checkpoint.writer import write_checkpoint
from vptq_mlc.errors import CheckpointError
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint, random_layer

LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", variant="v8-k256-16")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn) -> None:
    f = d / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def _raises_one_line(fn, *needles: str) -> str:
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ---- synthetic checkpoints ----


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_synthetic_roundtrip(tmp_path, arch):
    d = make_synthetic_checkpoint(tmp_path / arch, arch=arch, tie_word_embeddings=arch == "qwen2")
    ck = VPTQCheckpoint.open(d)
    ck.validate(progress=False)
    assert ck.arch == arch and ck.dtype == "float32" and ck.path == d
    assert len(ck.layers) == 14
    cfg = ck.layers["model.layers.1.mlp.down_proj"]
    assert (cfg.in_features, cfg.out_features) == (128, 64)
    assert ck.layers["model.layers.0.self_attn.k_proj"].out_features == 32  # 2 kv heads * 16
    has_bias = arch == "qwen2"
    assert ck.layers["model.layers.0.self_attn.q_proj"].bias is has_bias
    assert ("bias" in ck.layer_tensors("model.layers.0.self_attn.v_proj")) is has_bias
    dense = ck.dense_tensor_names()
    assert "model.embed_tokens.weight" in dense and "model.norm.weight" in dense
    assert ("lm_head.weight" in dense) is (arch != "qwen2")
    assert not any(n.startswith("model.layers.0.mlp.down_proj") for n in dense)
    names = {p.name for p in ck.tokenizer_files()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    hf = ck.hf_config
    for key in ("rope_theta", "rms_norm_eps", "max_position_embeddings", "rope_scaling", "num_key_value_heads"):
        assert key in hf
    assert hf["quantization_config"]["quant_method"] == "vptq"


def test_synthetic_is_fast_and_deterministic(tmp_path):
    import time

    t = time.perf_counter()
    a = make_synthetic_checkpoint(tmp_path / "a", seed=3)
    assert time.perf_counter() - t < 2.0
    b = make_synthetic_checkpoint(tmp_path / "b", seed=3)
    for f in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_synthetic_tokenizer_and_template(synth):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(synth / "tokenizer.json"))
    hf = json.loads((synth / "config.json").read_text())
    assert tok.get_vocab_size() == hf["vocab_size"] == 512
    text = "The river of the city, 42 people!"
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text and len(enc.ids) < len(text)
    tc = json.loads((synth / "tokenizer_config.json").read_text())
    assert tok.token_to_id(tc["eos_token"]) == hf["eos_token_id"]
    assert tok.token_to_id(tc["bos_token"]) == hf["bos_token_id"]
    import jinja2

    out = jinja2.Template(tc["chat_template"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_synthetic_loads_in_transformers_with_sane_logits(tmp_path):
    """The config is a valid HF config; the dequantized weights give finite, non-degenerate logits."""
    torch = import_required("torch", 'pip install -e ".[test]"')
    transformers = import_required("transformers", 'pip install -e ".[test]"')
    from vptq_mlc.checkpoint.dequant import dequantize

    d = make_synthetic_checkpoint(tmp_path / "q", arch="qwen2", tie_word_embeddings=True, variant="v8-k256-0")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ck = VPTQCheckpoint.open(d)
    cfg = dict(ck.hf_config)
    cfg.pop("quantization_config")
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    sd = {n: torch.from_numpy(ck.get(n)) for n in ck.dense_tensor_names()}
    for p, c in ck.layers.items():
        t = ck.layer_tensors(p)
        sd[f"{p}.weight"] = torch.from_numpy(dequantize(c, t))
        if c.bias:
            sd[f"{p}.bias"] = torch.from_numpy(t["bias"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(prompt)])).logits[0, -1]
    p = torch.softmax(logits, -1)
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 10 and p.max() < 0.9


# ---- writer round trip, sharding, dtypes ----


def _layers(rng, dtype="float32"):
    out = {}
    for path, variant, kw in [
        ("model.layers.0.self_attn.q_proj", "v8-k256-16", dict(outlier_size=16, outlier_vector_len=4,
                                                               num_outlier_centroids=16, group_num=2)),
        ("model.layers.0.mlp.down_proj", "v8-k4096-0", dict(is_indice_packed=False)),
    ]:
        i_f, o_f = (64, 64) if "q_proj" in path else (128, 64)
        cfg = VPTQLayerConfig.from_variant(variant, i_f, o_f, **kw)
        out[path] = (cfg, random_layer(cfg, rng, dtype))
    return out


def test_writer_roundtrip_and_sharding(tmp_path):
    rng = np.random.default_rng(0)
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300}
    layers = _layers(rng)
    dense = {"model.embed_tokens.weight": rng.standard_normal((300, 64)).astype(np.float32),
             "model.norm.weight": np.ones(64, np.float32), "lm_head.weight": np.zeros((300, 64), np.float32),
             "model.layers.0.input_layernorm.weight": np.ones(64, np.float32),
             "model.layers.0.post_attention_layernorm.weight": np.ones(64, np.float32)}
    for leaf, (o, i) in {"k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64)}.items():
        dense[f"model.layers.0.self_attn.{leaf}.weight"] = rng.standard_normal((o, i)).astype(np.float32)
    for leaf, (o, i) in {"gate_proj": (128, 64), "up_proj": (128, 64)}.items():
        dense[f"model.layers.0.mlp.{leaf}.weight"] = rng.standard_normal((o, i)).astype(np.float32)
    for shard, out in [(None, tmp_path / "single"), (40_000, tmp_path / "sharded")]:
        kw = {} if shard is None else {"max_shard_bytes": shard}
        d = write_checkpoint(out, hf, dense, layers, **kw)
        files = sorted(p.name for p in d.iterdir())
        if shard is None:
            assert files == ["config.json", "model.safetensors"]
        else:
            assert "model.safetensors.index.json" in files and "model-00001-of-" in files[1]
            idx = json.loads((d / "model.safetensors.index.json").read_text())
            assert len(set(idx["weight_map"].values())) > 2
            assert idx["metadata"]["total_size"] == sum(a.nbytes for a in dense.values()) + sum(
                a.nbytes for _, t in layers.values() for a in t.values())
        ck = VPTQCheckpoint.open(d)
        ck.validate(progress=False)
        assert ck.layers == {p: c for p, (c, _) in layers.items()}
        assert sorted(ck.dense_tensor_names()) == sorted(dense)
        for n, a in dense.items():
            got = ck.get(n)
            assert got.dtype == a.dtype and np.array_equal(got, a)
        for p, (_, t) in layers.items():
            got = ck.layer_tensors(p)
            assert set(got) == set(t)
            for k in t:
                assert got[k].dtype == t[k].dtype and np.array_equal(got[k], t[k]), (p, k)
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "vptq" and qc["config_for_layers"][LAYER]["is_indice_packed"] is False
        assert json.loads((d / "config.json").read_text())["torch_dtype"] == "float32"
        # files are plain safetensors other tools read (metadata format=pt is what transformers requires)
        with safe_open(str(next(d.glob("*.safetensors"))), "numpy") as f:
            assert f.metadata() == {"format": "pt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dirs cleaned up
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(tmp_path / "single", hf, dense, layers)


def test_bf16_is_widened_to_float32(tmp_path):
    torch = import_required("torch", 'pip install -e ".[test]"')
    from safetensors.torch import load_file as torch_load

    d = make_synthetic_checkpoint(tmp_path / "bf", dtype="bfloat16", variant="v8-k256-256")
    ck = VPTQCheckpoint.open(d)
    ck.validate(progress=False)
    assert ck.dtype == "bfloat16"
    assert ck.tensor_info(f"{LAYER}.centroids.weight").dtype == "bfloat16"
    ref = torch_load(str(d / "model.safetensors"))
    for name in (f"{LAYER}.centroids.weight", "model.embed_tokens.weight", f"{LAYER}.weight_scale"):
        got = ck.get(name)
        assert ref[name].dtype == torch.bfloat16 and got.dtype == np.float32
        np.testing.assert_array_equal(got, ref[name].float().numpy())
    np.testing.assert_array_equal(ck.get(f"{LAYER}.indices"), ref[f"{LAYER}.indices"].numpy())


def test_bf16_rounding_matches_torch():
    torch = import_required("torch", 'pip install -e ".[test]"')
    from vptq_mlc.checkpoint.schema import bf16_bits_to_f32, f32_to_bf16_bits

    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 10
    x[:4] = [np.inf, -np.inf, 0.0, -0.0]
    ours = bf16_bits_to_f32(f32_to_bf16_bits(x))
    np.testing.assert_array_equal(ours, torch.from_numpy(x).to(torch.bfloat16).float().numpy())


# ---- config shapes ----


def test_shared_layer_config_resolution(synth, tmp_path):
    d = _copy(synth, tmp_path / "shared")
    ref = VPTQCheckpoint.open(synth).layers

    def to_shared(cfg):
        qc = cfg["quantization_config"]
        shared = {}
        for path, lc in qc["config_for_layers"].items():
            leaf = path.rsplit(".", 1)[1]
            lc = {k: v for k, v in lc.items() if k not in ("in_features", "out_features", "group_size")}
            shared[leaf] = lc
        # keep one explicit entry: config_for_layers wins over shared_layer_config
        qc["config_for_layers"] = {LAYER: qc["config_for_layers"][LAYER]}
        qc["shared_layer_config"] = shared

    _edit_config(d, to_shared)
    ck = VPTQCheckpoint.open(d)
    assert ck.layers == ref
    ck.validate(progress=False)


def test_legacy_quant_config_and_text_config(synth, tmp_path):
    ref = VPTQCheckpoint.open(synth).layers
    legacy = _copy(synth, tmp_path / "legacy")
    _edit_config(legacy, lambda c: c.update(quant_config=c.pop("quantization_config")["config_for_layers"]))
    assert VPTQCheckpoint.open(legacy).layers == ref
    nested = _copy(synth, tmp_path / "nested")
    _edit_config(nested, lambda c: c.update(text_config={"quantization_config": c.pop("quantization_config")}))
    assert VPTQCheckpoint.open(nested).layers == ref


def test_unknown_layer_keys_ignored(synth, tmp_path):
    d = _copy(synth, tmp_path / "extra")

    def add(cfg):
        for lc in cfg["quantization_config"]["config_for_layers"].values():
            lc["norm_dim"] = 0
            lc["enable_proxy_error"] = False

    _edit_config(d, add)
    VPTQCheckpoint.open(d).validate(progress=False)


def test_partially_quantized_model(tmp_path):
    """A module without a layer config stays dense and must then store `<path>.weight`."""
    d = make_synthetic_checkpoint(tmp_path / "p")
    _edit_config(d, lambda c: c["quantization_config"]["config_for_layers"].pop(LAYER))
    ck = VPTQCheckpoint.open(d)
    assert LAYER not in ck.layers and f"{LAYER}.indices" in ck.dense_tensor_names()
    _raises_one_line(lambda: ck.validate(progress=False), f"{LAYER}.weight", "missing")


# ---- negative cases: each one CheckpointError with one line ----


def test_missing_dir_and_config(tmp_path):
    _raises_one_line(lambda: VPTQCheckpoint.open(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    _raises_one_line(lambda: VPTQCheckpoint.open(tmp_path / "empty"), "no config.json")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    _raises_one_line(lambda: VPTQCheckpoint.open(tmp_path / "empty"), "not valid JSON")


def test_not_a_vptq_checkpoint(synth, tmp_path):
    d = _copy(synth, tmp_path / "plain")
    _edit_config(d, lambda c: c.pop("quantization_config"))
    _raises_one_line(lambda: VPTQCheckpoint.open(d), "not a VPTQ checkpoint")
    _edit_config(d, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    _raises_one_line(lambda: VPTQCheckpoint.open(d), "not a VPTQ checkpoint", "gptq")


def test_unsupported_architecture(synth, tmp_path):
    d = _copy(synth, tmp_path / "arch")
    _edit_config(d, lambda c: c.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"]))
    _raises_one_line(lambda: VPTQCheckpoint.open(d), "unsupported architecture", "gemma2", "llama, qwen2, mistral")


def test_truncated_and_missing_weights(synth, tmp_path):
    d = _copy(synth, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _raises_one_line(lambda: VPTQCheckpoint.open(d), "model.safetensors", "truncated or corrupt")
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _raises_one_line(lambda: VPTQCheckpoint.open(d), "model.safetensors", "truncated or corrupt")
    f.unlink()
    _raises_one_line(lambda: VPTQCheckpoint.open(d), "no model.safetensors")


def test_missing_shard(tmp_path):
    d = make_synthetic_checkpoint(tmp_path / "sh", max_shard_bytes=20_000)
    VPTQCheckpoint.open(d).validate(progress=False)
    next(d.glob("model-00002-of-*.safetensors")).unlink()
    _raises_one_line(lambda: VPTQCheckpoint.open(d), "model-00002-of-", "missing")


@pytest.mark.parametrize(
    "mutate,needles",
    [
        (lambda t: t.update({f"{LAYER}.indices": t[f"{LAYER}.indices"][:, :-1]}),
         [LAYER, "'indices'", "expected int32 [1, 8, 48]", "found int32 [1, 7, 48]"]),
        (lambda t: t.update({f"{LAYER}.indices": t[f"{LAYER}.indices"].astype(np.int64)}),
         [LAYER, "'indices'", "expected int32", "found int64"]),
        (lambda t: t.update({f"{LAYER}.centroids.weight": t[f"{LAYER}.centroids.weight"].astype(np.float16)}),
         [LAYER, "'centroids.weight'", "expected float32", "found float16"]),
        (lambda t: t.pop(f"{LAYER}.weight_scale"), [LAYER, "'weight_scale'", "missing"]),
        (lambda t: t.update({f"{LAYER}.weight": np.zeros((64, 128), np.float32)}),
         [LAYER, "unexpected tensor 'weight'"]),
        (lambda t: t.update({f"{LAYER}.perm": np.zeros(128, np.int16)}), [LAYER, "'perm'", "permutation"]),
        (lambda t: t.update({f"{LAYER}.centroids.weight": np.full_like(t[f"{LAYER}.centroids.weight"], np.nan)}),
         [LAYER, "NaN"]),
        (lambda t: t.pop("lm_head.weight"), ["lm_head.weight", "missing"]),
        (lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}), ["model.norm.weight", "[64]", "[65]"]),
    ],
    ids=["shape", "dtype-int", "dtype-float", "missing", "unexpected", "perm", "nan", "lm_head", "dense-shape"],
)
def test_validate_failures(synth, tmp_path, mutate, needles):
    d = _copy(synth, tmp_path / "bad")
    _edit_tensors(d, mutate)
    ck = VPTQCheckpoint.open(d)
    _raises_one_line(lambda: ck.validate(progress=False), *needles)


def test_index_out_of_range(tmp_path):
    """Unpacked int16 codes can exceed a small codebook (packed codes cannot: they have exactly log2 K bits)."""
    d = make_synthetic_checkpoint(tmp_path / "oor", variant="v8-k256-16", layer_kwargs={"is_indice_packed": False})
    VPTQCheckpoint.open(d).validate(progress=False)
    for name, k in (("indices", 256), ("res_indices", 16)):
        def bump(t, name=name):
            a = t[f"{LAYER}.{name}"].copy()
            a[0, 3, 5] = -2  # uint16 65534
            t[f"{LAYER}.{name}"] = a
        dd = _copy(d, tmp_path / f"oor-{name}")
        _edit_tensors(dd, bump)
        _raises_one_line(lambda: VPTQCheckpoint.open(dd).validate(progress=False),
                         LAYER, f"'{name}'", f"codes < {k}", "65534")


def test_perm_present_when_disabled(tmp_path):
    d = make_synthetic_checkpoint(tmp_path / "pf", layer_kwargs={"enable_perm": False})
    _edit_tensors(d, lambda t: t.update({f"{LAYER}.perm": np.arange(128, dtype=np.int16)}))
    ck = VPTQCheckpoint.open(d)
    _raises_one_line(lambda: ck.validate(progress=False), LAYER, "'perm'", "enable_perm is false")


def test_config_shape_mismatch(synth, tmp_path):
    d = _copy(synth, tmp_path / "cfg")
    _edit_config(d, lambda c: c["quantization_config"]["config_for_layers"][LAYER].update(in_features=64,
                                                                                        group_size=64))
    _raises_one_line(lambda: VPTQCheckpoint.open(d), LAYER, "64/64", "128/64")
    _edit_config(d, lambda c: c["quantization_config"]["config_for_layers"][LAYER].update(group_size=60))
    _raises_one_line(lambda: VPTQCheckpoint.open(d), LAYER, "in_features")


def test_get_unknown_and_layer_tensors_of_dense(synth):
    ck = VPTQCheckpoint.open(synth)
    _raises_one_line(lambda: ck.get("model.nope"), "model.nope")
    _raises_one_line(lambda: ck.layer_tensors("model.norm"), "not a quantized layer")


def test_synthetic_tokenizer_fills_large_vocab():
    from tokenizers import Tokenizer

    from vptq_mlc.testing.synthetic import synthetic_tokenizer_json

    tok = Tokenizer.from_str(synthetic_tokenizer_json(2048))
    assert tok.get_vocab_size() == 2048 and tok.id_to_token(2047).startswith("<|reserved_special_token_")
