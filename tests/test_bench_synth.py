"""`vptq-mlc bench synth-model` presets: a shape's extras (RoPE base, max batch, the config-only vocabulary) reach the
converted config. A tiny stand-in shape keeps it to seconds; the 405B preset itself is checked against Llama 3.1
405B's published config.json values."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from vptq_mlc.bench import synth


def test_405b_preset_has_the_real_shape() -> None:
    # meta-llama/Llama-3.1-405B config.json: hidden 16384, intermediate 53248, 126 layers, 128 heads, 8 KV heads
    assert synth.SHAPES["llama3.1-405b"] == ("llama", 16384, 53248, 126, 128, 8, 128256)
    assert synth.SHAPE_EXTRAS["llama3.1-405b"]["rope_theta"] == 500000.0


def test_config_only_extras(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(synth.SHAPES, "tiny-test", ("llama", 64, 128, 3, 4, 2, 1000))
    monkeypatch.setitem(synth.SHAPE_EXTRAS, "tiny-test",
                        {"rope_theta": 500000.0, "max_batch_size": 4, "config_only_vocab": 300})
    out = synth.synth_model(tmp_path / "m", "tiny-test", "v8-k256-0", config_only=True)
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    mc = cfg["model_config"]
    assert cfg["vocab_size"] == mc["vocab_size"] == cfg["active_vocab_size"] == 1000
    assert mc["position_embedding_base"] == 500000.0 and mc["max_batch_size"] == 4 and mc["num_hidden_layers"] == 3
    assert {k.split(".")[2] for k in cfg["vptq"]["layers"]} == {"0", "1", "2"}
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True) <= 300
    assert not (out / "tensor-cache.json").exists()


def test_config_only_tokenizer_follows_the_vocab(tmp_path, monkeypatch) -> None:
    """Without a `config_only_vocab` extra (the Llama-3.1-8B preset), the config-only dir's tokenizer has the
    config's full vocabulary, so sampling benchmarks see every token (no ids past the tokenizer)."""
    assert synth.SHAPES["llama3.1-8b"][-1] == 128256 and "config_only_vocab" not in synth.SHAPE_EXTRAS.get(
        "llama3.1-8b", {})
    monkeypatch.setitem(synth.SHAPES, "tiny-full-vocab", ("llama", 64, 128, 2, 4, 2, 2000))
    out = synth.synth_model(tmp_path / "m", "tiny-full-vocab", "v8-k256-0", config_only=True)
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True) == 2000
    assert cfg["vocab_size"] == 2000
