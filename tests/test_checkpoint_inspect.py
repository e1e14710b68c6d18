"""`vptq-mlc inspect`: report contents, byte totals against the files on disk, one-line errors."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from vptq_mlc.cli import main
from vptq_mlc.testing.synthetic import make_synthetic_checkpoint


def test_inspect_report_and_sizes(tmp_path):
    d = make_synthetic_checkpoint(tmp_path / "m", arch="qwen2", variant="v8-k256-16", max_shard_bytes=100_000)
    r = CliRunner().invoke(main, ["inspect", str(d)])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "architecture qwen2 (2 decoder layers)" in out and "v8-k256-16 x14" in out
    assert "model.layers.*.mlp.down_proj x2" in out and "validation      OK" in out
    r = CliRunner().invoke(main, ["inspect", "--json", "--no-validate", str(d)])
    s = json.loads(r.output)
    # total = all tensor bytes in the shards (file size minus the 8-byte length and the header)
    data = 0
    for f in d.glob("*.safetensors"):
        raw = f.read_bytes()
        data += len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
    assert s["total_bytes"] == data
    # index bytes from the format: G*N*ceil(S*tb/32) int32 words per layer (G=1, v=8, tb=12, S=in_features)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    assert s["index_bytes"] == 2 * sum(math.ceil(o / 8) * math.ceil(i * 12 / 32) * 4 for o, i in shapes.values())
    assert s["quantized_weights"] == 2 * sum(o * i for o, i in shapes.values())
    assert len(s["layers"]) == 14 and s["layers"][0]["nominal_bits"] == 1.5
    row = next(x for x in s["layers"] if x["path"].endswith("0.mlp.down_proj"))
    assert "perm" in row["flags"] and "norm" in row["flags"]
    r = CliRunner().invoke(main, ["inspect", "--all-layers", "--no-validate", str(d)])
    assert "model.layers.1.self_attn.q_proj" in r.output and "validation" not in r.output


def test_inspect_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("error: ")
    d = make_synthetic_checkpoint(tmp_path / "bad")
    f = d / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight_scale"] = np.ones(65, np.float32)
    save_file(t, str(f), metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["inspect", str(d)])
    assert r.exit_code == 1
    err = r.output.strip().splitlines()[-1]
    assert err.startswith("error: layer model.layers.1.mlp.up_proj: tensor 'weight_scale' expected float32 [64]")
