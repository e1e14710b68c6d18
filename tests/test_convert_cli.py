"""Issue 3: broken inputs to `vptq-mlc convert` give exit code != 0, one line on stderr, and no output dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from vptq_mlc.artifact.tensor_cache import read_index
from vptq_mlc.cli import main
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", variant="v8-k256-16",
                                     layer_kwargs={"is_indice_packed": False})


def _config(fn):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _tensors(fn):
    def edit(d: Path) -> None:
        t = load_file(str(d / "model.safetensors"))
        fn(t)
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _out_of_range(t: dict) -> None:
    a = t[f"{LAYER}.indices"].copy()
    a[0, 1, 2] = -1  # uint16 65535 >= K = 256
    t[f"{LAYER}.indices"] = a


BROKEN = {
    "missing-config": (lambda d: (d / "config.json").unlink(), "config.json"),
    "not-vptq": (_config(lambda c: c.pop("quantization_config")), "not a VPTQ"),
    "truncated": (_truncate, "model.safetensors"),
    "shape": (_tensors(lambda t: t.update({f"{LAYER}.indices": t[f"{LAYER}.indices"][:, :-1]})), LAYER),
    "dtype": (_tensors(lambda t: t.update(
        {f"{LAYER}.centroids.weight": t[f"{LAYER}.centroids.weight"].astype(np.float16)})), "float16"),
    "index-range": (_tensors(_out_of_range), "65535"),
    "architecture": (_config(lambda c: c.update({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})), "gpt2"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_fails_cleanly(synth, tmp_path, case):
    mutate, needle = BROKEN[case]
    bad = Path(shutil.copytree(synth, tmp_path / "bad"))
    mutate(bad)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(bad), "-o", str(out)])
    assert r.exit_code != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


def test_convert_writes_mlc_layout(synth, tmp_path):
    out = tmp_path / "mlc"
    r = CliRunner().invoke(main, ["convert", str(synth), "-o", str(out)])
    assert r.exit_code == 0, r.output
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    assert chat["model_type"] == "llama" and chat["quantization"] == "vptq-v8-k256-16"
    assert (out / "tokenizer.json").is_file() and "tokenizer.json" in chat["tokenizer_files"]
    # the one ChatConfig reads what convert wrote and writes it back byte for byte (unknown keys survive too)
    from vptq_mlc.artifact.chat_config import ChatConfig

    loaded = ChatConfig.load(out)
    eos = chat["eos_token_id"]
    assert loaded.eos_token_ids == (eos if isinstance(eos, list) else [eos])
    assert loaded.vptq_layers().keys() == chat["vptq"]["layers"].keys()
    again = tmp_path / "again"
    again.mkdir()
    assert loaded.write(again).read_bytes() == (out / "mlc-chat-config.json").read_bytes()
    extra = ChatConfig.from_json({**chat, "custom_key": [1, 2]})
    assert extra.to_json()["custom_key"] == [1, 2]
    index = read_index(out)
    assert index[f"{LAYER}.codes"]["dtype"] == "uint8" and index[f"{LAYER}.codes"]["shape"] == [8, 128]  # K = 256
    assert index[f"{LAYER}.perm"]["dtype"] == "int32"
    # a second convert onto the same directory refuses rather than mixing outputs
    r = CliRunner().invoke(main, ["convert", str(synth), "-o", str(out)])
    assert r.exit_code != 0 and "--overwrite" in r.stderr
