"""The independent reference for end-to-end tests: a plain transformers model holding the dense weights.

Dense weights come from the checkpoint's safetensors read with `safetensors.numpy` (not our reader) and from
tests/reference_dequant.py (not our dequantizer), so nothing of vptq_mlc is on the reference side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from reference_dequant import ref_dequant

SHORT = (
    "centroids.weight", "res_centroids.weight", "outlier_centroids.weight", "indices", "res_indices",
    "outlier_indices", "perm", "weight_scale", "weight_bias", "bias",
)


def dense_state_dict(ckpt: Path) -> tuple[dict, dict[str, np.ndarray]]:
    import torch
    from safetensors.torch import load_file

    hf = json.loads((ckpt / "config.json").read_text())
    raw: dict[str, np.ndarray] = {}
    for f in sorted(ckpt.glob("*.safetensors")):  # torch reads bf16 (numpy has none): widened to fp32, exactly
        raw.update({k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in load_file(f).items()})
    qcfg = hf.pop("quantization_config")["config_for_layers"]
    state: dict[str, np.ndarray] = {}
    for path, c in qcfg.items():
        t = {s: raw.pop(f"{path}.{s}") for s in SHORT if f"{path}.{s}" in raw}
        state[f"{path}.weight"] = ref_dequant(c, t).astype(np.float32)
        if "bias" in t:
            state[f"{path}.bias"] = t["bias"].astype(np.float32)
    state.update({k: v.astype(np.float32) for k, v in raw.items()})
    return hf, state


def reference_model(ckpt: str | Path):
    """transformers *ForCausalLM (fp32, eager attention) with the checkpoint's dense dequantized weights."""
    import torch
    import transformers

    hf, state = dense_state_dict(Path(ckpt))
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
           "deepseek_v3": "DeepseekV3ForCausalLM"}[hf["model_type"]]
    hf.pop("dtype", None)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "torch_dtype"})
    config._attn_implementation = "eager"
    model = getattr(transformers, cls)(config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def reference_greedy(model, prompt_ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    """The transformers model's `n` greedy tokens after `prompt_ids` (EOS ignored, as the engine tests ask)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
