"""The latent (MLA) KV-cache path of deepseek_v3, checked on the CPU against transformers' DeepseekV3Attention.

TVM 0.27 has no CPU kernels for its MLA cache, so the library cannot run here. What we add around those kernels is
checked instead: the absorbed W_UK / W_UV that `convert` writes (from a VPTQ-coded kv_b_proj), our TE functions
(model/deepseek_v3.py: the roped query and the token latent, the chunk's decompressed K/V, the merge of the two
attention parts) built for llvm, and the algebra that joins them: the paged part attends with q_nope @ W_UK over
cached latents and multiplies its output by W_UV. TVM's two kernels are stood in for by their contract in numpy
(softmax output and log2-sum-exp per row and head; an empty page list gives 0 and lse -5e4, and the cross kernel
writes nothing when no sequence of the batch has cached tokens). The reference is transformers' attention output
(after o_proj) of the checkpoint's dense dequantized weights: every case matches it within 1e-4 of its scale.
And the CUDA library builds with the MLA cache (`compile --target cuda --kv-cache mla`, no GPU needed), with the MLA
kernels in it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from reference_model import reference_model
from test_cuda_aot import require_cuda_toolkit
from tvm import te

from vptq_mlc.artifact.tensor_cache import read_index, read_tensor
from vptq_mlc.checkpoint.arch import model_config_from_json
from vptq_mlc.checkpoint.mla import absorbed_names
from vptq_mlc.convert.converter import convert_checkpoint
from vptq_mlc.model.deepseek_v3 import _mla_latent, _mla_merge, _mla_self_kv, _sequence_starts
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

# interleaved yarn rope with mscale_all_dim (the softmax scale changes too), q LoRA, 4 heads
CKPT = dict(arch="deepseek_v3", num_layers=2, vocab_size=320, seed=5,
            hf_overrides={"max_position_embeddings": 256,
                          "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                           "mscale": 1.0, "mscale_all_dim": 0.7}})
TOKENS = 13
LOG2E = 1.4426950408889634
EMPTY_LSE = -5e4  # TVM's kernels: the log2-sum-exp of a row that attended to nothing (init_states)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Converted checkpoint, transformers' layer-0 attention (its input, output and modules) on one prompt."""
    root = tmp_path_factory.mktemp("mla")
    ckpt = make_synthetic_checkpoint(root / "ckpt", **CKPT)
    model_dir = convert_checkpoint(ckpt, root / "model", dtype="float32")
    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    assert "model.layers.0.self_attn.kv_b_proj" in chat["vptq"]["layers"]  # the absorbed tensors come dequantized
    cfg = model_config_from_json("deepseek_v3", chat["model_config"])
    index = read_index(model_dir)
    uk, uv = (read_tensor(model_dir, index[n]) for n in absorbed_names(0))
    model = reference_model(ckpt)
    attn = model.model.layers[0].self_attn
    seen = {}
    attn.register_forward_hook(lambda m, a, kw, out: seen.update(x=kw["hidden_states"], out=out[0]), with_kwargs=True)
    ids = torch.tensor([np.random.default_rng(1).integers(3, 320, TOKENS).tolist()])
    with torch.no_grad():
        model(ids)
    return dict(cfg=cfg, uk=uk, uv=uv, attn=attn, x=seen["x"], out=seen["out"][0].numpy(), model_dir=model_dir,
                ckpt=ckpt)


def _run_te(fn, inputs: list[np.ndarray], *consts) -> list[np.ndarray]:  # noqa: ANN001
    """Build `fn(placeholders..., *consts)` for llvm and run it on `inputs`."""
    holders = [te.placeholder(a.shape, str(a.dtype), name=f"in{i}") for i, a in enumerate(inputs)]
    outs = fn(*holders, *consts)
    outs = outs if isinstance(outs, list) else [outs]
    func = te.create_prim_func([*holders, *outs]).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in inputs]
    res = [tvm.runtime.empty([int(d) for d in o.shape], o.dtype, dev) for o in outs]
    lib["main"](*args, *res)
    return [r.numpy() for r in res]


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal_from: int | None):
    """TVM's attention contract per query row and head: (softmax(q.k * scale) @ v, log2-sum-exp of the scores);
    q [rows, heads, d], k [keys, heads or 1, d], v [keys, heads or 1, dv]; `causal_from`: row i sees keys
    <= causal_from + i. No key: output 0 and lse EMPTY_LSE."""
    rows, heads = q.shape[:2]
    out, lse = np.zeros((rows, heads, v.shape[-1])), np.full((rows, heads), EMPTY_LSE)
    for i in range(rows):
        n = k.shape[0] if causal_from is None else causal_from + i + 1
        if n == 0:
            continue
        for h in range(heads):
            kh, vh = k[:n, min(h, k.shape[1] - 1)], v[:n, min(h, v.shape[1] - 1)]
            s = kh @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = p @ vh / p.sum()
            lse[i, h] = (s.max() + np.log(p.sum())) * LOG2E
    return out, lse


def _parts(case: dict) -> dict:
    """Everything before the cache for all TOKENS positions: the roped query, the token latents (our TE), the
    chunk keys/values of kv_b_proj (our TE), the absorbed query."""
    c, attn, x = case["cfg"], case["attn"], case["x"]
    nope, rope, lora, heads = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.num_attention_heads
    with torch.no_grad():
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))).view(1, TOKENS, heads, nope + rope).numpy()
        compressed, k_rope = torch.split(attn.kv_a_proj_with_mqa(x), [lora, rope], dim=-1)
        compressed = attn.kv_a_layernorm(compressed)
        kv_heads = attn.kv_b_proj(compressed).view(1, TOKENS, heads, nope + c.v_head_dim).numpy()
    positions = np.arange(TOKENS, dtype=np.int32)
    inv_freq = np.asarray(c.rope_inv_freq, np.float32)
    q_roped, latent = _run_te(_mla_latent, [q, compressed.numpy(), k_rope.numpy(), positions, inv_freq], nope, rope,
                              float(c.rope_attention_factor), bool(c.rope_interleave))
    k_self, v_self = _run_te(_mla_self_kv, [kv_heads, latent], nope, c.v_head_dim, lora)
    absorbed = np.einsum("thn,hnl->thl", q_roped[0, :, :, :nope], case["uk"])
    q_latent = np.concatenate([absorbed, q_roped[0, :, :, nope:]], axis=-1)  # [tokens, heads, lora + rope]
    return dict(q=q_roped[0], latent=latent[0], k=k_self[0], v=v_self[0], q_latent=q_latent)


def _cross(case: dict, parts: dict, rows: slice, cached: int):
    """The paged part for query `rows` over the first `cached` latents, with the output taken through W_UV."""
    lora = case["cfg"].kv_lora_rank
    lat = parts["latent"][:cached, None, :]
    o_lat, lse = _attend(parts["q_latent"][rows], lat, lat[..., :lora], case["cfg"].softmax_scale, None)
    return np.einsum("thl,hlv->thv", o_lat, case["uv"]), lse


def _self(case: dict, parts: dict, rows: slice):
    """The chunk's own part: causal over its rows' decompressed keys and values."""
    return _attend(parts["q"][rows], parts["k"][rows], parts["v"][rows], case["cfg"].softmax_scale, 0)


def _merged(batch: list[tuple], positions: np.ndarray, sequences: int) -> np.ndarray:
    """Our merge TE over a batch of (o_self, lse_self, o_cross, lse_cross) per sequence, rows concatenated."""
    o_s, l_s, o_c, l_c = (np.concatenate([b[i] for b in batch])[None].astype(np.float32) for i in range(4))
    (starts,) = _run_te(_sequence_starts, [positions.astype(np.int32)])
    (out,) = _run_te(_mla_merge, [o_s, l_s, o_c, l_c, starts], sequences)
    return out[0]


def _check(case: dict, heads_out: np.ndarray, rows: slice) -> float:
    """o_proj of our attention rows against transformers' layer output rows; returns the error / scale."""
    with torch.no_grad():
        got = case["attn"].o_proj(torch.from_numpy(heads_out.reshape(heads_out.shape[0], -1))).numpy()
    want = case["out"][rows]
    err = float(np.abs(got - want).max() / np.abs(case["out"]).max())
    assert err < 1e-4, f"rows {rows}: {err:.3g} of the scale"
    return err


def test_absorbed_tensors_are_kv_b_proj_per_head(case: dict) -> None:
    """W_UK [heads, qk_nope, kv_lora] and W_UV [heads, kv_lora, v] hold transformers' dense kv_b_proj rows."""
    c = case["cfg"]
    w = case["attn"].kv_b_proj.weight.detach().numpy().reshape(c.num_attention_heads, -1, c.kv_lora_rank)
    np.testing.assert_allclose(case["uk"], w[:, : c.qk_nope_head_dim], rtol=0, atol=1e-6)
    np.testing.assert_allclose(case["uv"], w[:, c.qk_nope_head_dim :].transpose(0, 2, 1), rtol=0, atol=1e-6)


def test_absorbed_tensors_of_a_dense_kv_b_proj(case: dict, tmp_path: Path) -> None:
    """A checkpoint whose kv_b_proj is dense (its dequantized weight stored as `kv_b_proj.weight`): convert writes
    the same W_UK / W_UV from the dense tensor."""
    from safetensors.numpy import load_file, save_file

    src, dst = case["ckpt"], tmp_path / "dense"
    dst.mkdir()
    layer = "model.layers.0.self_attn.kv_b_proj"
    raw = {}
    for f in sorted(src.glob("*.safetensors")):
        raw.update(load_file(f))
    raw = {k: v for k, v in raw.items() if not k.startswith(f"{layer}.")}
    raw[f"{layer}.weight"] = case["attn"].kv_b_proj.weight.detach().numpy().astype(np.float32)
    save_file(raw, dst / "model.safetensors")
    hf = json.loads((src / "config.json").read_text())
    del hf["quantization_config"]["config_for_layers"][layer]
    (dst / "config.json").write_text(json.dumps(hf))
    for f in src.iterdir():  # tokenizer and generation config
        if f.suffix != ".safetensors" and f.name != "config.json":
            (dst / f.name).write_bytes(f.read_bytes())
    model_dir = convert_checkpoint(dst, tmp_path / "model", dtype="float32")
    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    assert layer not in chat["vptq"]["layers"]
    index = read_index(model_dir)
    uk, uv = (read_tensor(model_dir, index[n]) for n in absorbed_names(0))
    np.testing.assert_array_equal(uk, case["uk"])
    np.testing.assert_array_equal(uv, case["uv"])


def test_prefill_after_cached_tokens_merges_both_parts(case: dict) -> None:
    parts = _parts(case)
    history, rows = 5, slice(5, TOKENS)
    out = _merged([(*_self(case, parts, rows), *_cross(case, parts, rows, history))], np.arange(5, TOKENS), 1)
    _check(case, out, rows)


def test_fresh_prefill_ignores_the_unwritten_cross_outputs(case: dict) -> None:
    parts = _parts(case)
    rows = slice(0, TOKENS)
    o_self, lse_self = _self(case, parts, rows)
    garbage = (np.full_like(o_self, np.nan), np.full_like(lse_self, 3e4))  # the cross kernel did not run
    out = _merged([(o_self, lse_self, *garbage)], np.arange(TOKENS), 1)
    _check(case, out, rows)


def test_one_token_rows_take_the_cross_part_alone(case: dict) -> None:
    """Decode, or a prefill of one token per sequence: TVM appends before attention, so the pages hold the token
    and the self part (the token once more) must not count."""
    parts = _parts(case)
    row = slice(TOKENS - 1, TOKENS)
    out = _merged([(*_self(case, parts, row), *_cross(case, parts, row, TOKENS))], np.asarray([TOKENS - 1]), 1)
    _check(case, out, row)


def test_batch_of_a_fresh_and_a_continued_sequence(case: dict) -> None:
    """Two sequences in one prefill: the first fresh (the kernel's empty-page answer for it), the second
    continuing after 8 cached tokens; each row against transformers' row of the same position."""
    parts = _parts(case)
    fresh, cont = slice(0, 4), slice(8, TOKENS)
    o_c, l_c = _cross(case, parts, fresh, 0)
    batch = [(*_self(case, parts, fresh), o_c, l_c), (*_self(case, parts, cont), *_cross(case, parts, cont, 8))]
    out = _merged(batch, np.concatenate([np.arange(4), np.arange(8, TOKENS)]), 2)
    _check(case, out[:4], fresh)
    _check(case, out[4:], cont)


def test_cuda_library_builds_with_the_mla_cache(case: dict, tmp_path: Path) -> None:
    """`compile --target cuda --kv-cache mla` (no GPU needed): TVM's MLA kernel and the metadata saying so are in
    the library. About 30 s on 2 cores."""
    require_cuda_toolkit(cuobjdump=False)
    from vptq_mlc.compile.build import compile_model

    (lib,) = compile_model(case["model_dir"], "cuda", tmp_path / "mla.so", arch="sm_90", static_batches=(),
                           kv_cache="mla")
    blob = lib.read_bytes()
    assert b"batch_prefill_paged_kv_mla" in blob and b'"attn_kind": "mla"' in blob


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VPTQ_MLC_SLOW"), reason="R1-shaped CUDA build, ~2.5 min on 2 cores: "
                    "set VPTQ_MLC_SLOW=1 to run it")
def test_cuda_library_builds_at_r1_attention_shape(tmp_path: Path) -> None:
    """R1's attention: 128 heads, latent 512 + 64 (the MLA kernel's rows are tokens x 128 heads), decompressed
    192 / 128 for the chunk's self-attention (146 s here, most of it building 128-head VPTQ layers)."""
    require_cuda_toolkit(cuobjdump=False)
    from vptq_mlc.compile.build import compile_model

    r1 = {"kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "q_lora_rank": 64,
          "n_routed_experts": 4, "n_group": 2, "first_k_dense_replace": 1}
    ckpt = make_synthetic_checkpoint(tmp_path / "ckpt", arch="deepseek_v3", num_layers=2, num_heads=128,
                                     vocab_size=320, dtype="float16", hf_overrides=r1)
    model_dir = convert_checkpoint(ckpt, tmp_path / "model", dtype="float16")
    (lib,) = compile_model(model_dir, "cuda", tmp_path / "mla.so", arch="sm_90", static_batches=(), kv_cache="mla")
    blob = lib.read_bytes()
    assert b"batch_prefill_paged_kv_mla" in blob and b'"head_dim": 576' in blob


def test_kv_bytes_per_token_of_r1() -> None:
    """From the library's `_metadata.kv_cache`: R1 (61 layers, fp16) holds one 512 + 64 latent per layer and token
    on the MLA cache, K and V of 128 heads of 192 on the decompressed one."""
    from vptq_mlc.runtime.memory import kv_bytes_per_token

    mla = {"num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 1, "head_dim": 576,
           "attn_kind": "mla"}
    mha = {**mla, "num_key_value_heads": 128, "head_dim": 192, "attn_kind": "mha"}
    assert kv_bytes_per_token({}, "float16", mla) == 61 * 576 * 2 == 70_272
    assert kv_bytes_per_token({}, "float16", mha) == 2 * 61 * 128 * 192 * 2 == 5_996_544


def test_cache_choice_and_missing_absorbed_tensors_are_one_line_errors(case: dict) -> None:
    from tvm.relax.frontend import nn

    from vptq_mlc.compile.build import LATENT_BY_DEFAULT, _check_params, latent_kv_cache
    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.errors import CompileError, RuntimeLoadError
    from vptq_mlc.runtime.library import _checked_records

    cpu, cuda = resolve_backend("llvm", "x86-64-v3")[0], resolve_backend("cuda", "sm_90")[0]
    assert latent_kv_cache("mla", "deepseek_v3", cuda) and not latent_kv_cache("mha", "deepseek_v3", cuda)
    assert latent_kv_cache("auto", "deepseek_v3", cuda) == LATENT_BY_DEFAULT
    assert not latent_kv_cache("auto", "deepseek_v3", cpu) and not latent_kv_cache("auto", "llama", cuda)
    with pytest.raises(CompileError, match="needs a GPU target .* use --kv-cache mha"):
        latent_kv_cache("mla", "deepseek_v3", cpu)
    with pytest.raises(CompileError, match="is for deepseek_v3 models"):
        latent_kv_cache("mla", "llama", cuda)
    absent = {"name": absorbed_names(7)[0], "shape": [1], "dtype": "float32"}  # an artifact without them
    with pytest.raises(RuntimeLoadError, match=r"re-run `vptq-mlc convert` .* or compile the library with --kv-cache"):
        _checked_records(case["model_dir"], [absent], None)
    with pytest.raises(CompileError, match=r"re-run `vptq-mlc convert` .* or compile with --kv-cache mha"):
        _check_params([(absent["name"], nn.Parameter((1,), "float32"))], case["model_dir"])
