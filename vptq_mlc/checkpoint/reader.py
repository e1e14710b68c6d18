"""Reading a VPTQ checkpoint directory exactly as VPTQ-community ships it (vptq-format.md sections 1, 2, 6).

Opening reads only config.json and the safetensors headers; tensors are loaded one at a time on `get`. numpy has no
bfloat16, so bf16 tensors come back widened to float32 (exactly: bf16 is the top half of an fp32); `tensor_info`
still reports the stored dtype. Every problem a user can fix raises a one-line `CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vptq_mlc.checkpoint.arch import decoder_linears, detect_arch, required_dense
from vptq_mlc.checkpoint.dequant import decode_codes
from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.checkpoint.packing import padding_bits_clear
from vptq_mlc.checkpoint.schema import FLOAT, FLOAT_DTYPES, SHORT_NAMES, ST_DTYPES, bf16_bits_to_f32, expected_tensors
from vptq_mlc.checkpoint.writer import TOKENIZER_FILE_NAMES
from vptq_mlc.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what is stored (dtype as a numpy-style name, `bfloat16` included)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header ourselves (to locate bf16 data) after safe_open has vetted the file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def find_quant_config(hf: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(config_for_layers, shared_layer_config, modules_to_not_convert) from any of the three config shapes."""
    qc = hf.get("quantization_config")
    if qc is None and isinstance(hf.get("text_config"), Mapping):
        qc = hf["text_config"].get("quantization_config")
    if qc is not None:
        if not isinstance(qc, Mapping) or str(qc.get("quant_method", "")).lower() != "vptq":
            method = qc.get("quant_method") if isinstance(qc, Mapping) else qc
            raise CheckpointError(
                f"not a VPTQ checkpoint: quantization_config.quant_method is {method!r}, expected 'vptq'"
            )
        if qc.get("enable_proxy_error"):
            log.warning("quantization_config.enable_proxy_error is set; ignored (transformers would refuse it)")
        cfl, shared = qc.get("config_for_layers") or {}, qc.get("shared_layer_config") or {}
        if not cfl and not shared:
            raise CheckpointError("VPTQ quantization_config has neither config_for_layers nor shared_layer_config")
        return dict(cfl), dict(shared), list(qc.get("modules_to_not_convert") or [])
    legacy = hf.get("quant_config")
    if isinstance(legacy, Mapping) and legacy:
        if "config_for_layers" in legacy:  # a half-migrated config
            return dict(legacy["config_for_layers"]), dict(legacy.get("shared_layer_config") or {}), []
        return dict(legacy), {}, []
    raise CheckpointError(
        "not a VPTQ checkpoint: config.json has no quantization_config with quant_method 'vptq' "
        "(nor legacy quant_config)"
    )


def resolve_layers(hf: Mapping[str, Any]) -> dict[str, VPTQLayerConfig]:
    """Module path -> layer config: `config_for_layers[path]`, else `shared_layer_config[leaf]`, else dense."""
    cfl, shared, skip = find_quant_config(hf)
    out: dict[str, VPTQLayerConfig] = {}
    for path, lin in decoder_linears(hf).items():
        leaf = path.rsplit(".", 1)[1]
        i_f, o_f = lin.in_features, lin.out_features
        if path in cfl:
            d = cfl[path]
        elif leaf in shared and leaf not in skip and path not in skip:
            d = shared[leaf]
        else:
            continue
        if not isinstance(d, Mapping):
            raise CheckpointError(f"layer config for {path} is not an object; fix config.json")
        cfg = VPTQLayerConfig.from_json(d, in_features=i_f, out_features=o_f, where=path)
        if (cfg.in_features, cfg.out_features) != (i_f, o_f):
            raise CheckpointError(
                f"layer {path}: config says in/out features {cfg.in_features}/{cfg.out_features}, the architecture "
                f"needs {i_f}/{o_f}; fix config.json"
            )
        out[path] = cfg
    for path, d in cfl.items():  # quantized modules outside the decoder linears (e.g. lm_head)
        if path not in out:
            if not isinstance(d, Mapping) or "in_features" not in d or "out_features" not in d:
                raise CheckpointError(f"layer config for {path} (not a decoder linear) must give in/out_features")
            out[path] = VPTQLayerConfig.from_json(d, where=path)
    return out


class VPTQCheckpoint:
    """A VPTQ checkpoint directory: HF config, per-layer VPTQ configs and lazily loaded tensors."""

    def __init__(self, path: Path, hf_config: dict[str, Any], layers: dict[str, VPTQLayerConfig],
                 tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.hf_config = hf_config
        self.arch = detect_arch(hf_config)
        self._linears = decoder_linears(hf_config)  # path -> shape and bias under this config (attention_bias, ...)
        self.layers = layers
        self._tensors = tensors
        self._handles: dict[Path, Any] = {}
        dt = hf_config.get("torch_dtype") or hf_config.get("dtype")
        if not dt:
            first = next((self._tensors[f"{p}.centroids.weight"] for p in layers
                          if f"{p}.centroids.weight" in self._tensors), None)
            dt = first.dtype if first else "float16"
        self.dtype = str(dt).removeprefix("torch.")

    # ---- opening ----
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> VPTQCheckpoint:
        """Read config.json and the safetensors headers (no tensor data)."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint directory {root} does not exist; check the path")
        cfg_file = root / "config.json"
        if not cfg_file.is_file():
            if (root / "mlc-chat-config.json").is_file():
                raise CheckpointError(
                    f"{root} is a converted model directory, not a checkpoint: compile it with `vptq-mlc compile "
                    f"{root}` and run it with `vptq-mlc chat {root}`; inspect/convert take the VPTQ checkpoint")
            raise CheckpointError(f"{root} has no config.json; point at a Hugging Face model directory")
        try:
            hf = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); fix or re-download it") from None
        if not isinstance(hf, dict):
            raise CheckpointError(f"{cfg_file} must hold a JSON object")
        find_quant_config(hf)  # "not a VPTQ checkpoint" comes before "unsupported architecture"
        detect_arch(hf)
        layers = resolve_layers(hf)
        return cls(root, hf, layers, cls._scan_weights(root))

    @staticmethod
    def _scan_weights(root: Path) -> dict[str, TensorInfo]:
        from safetensors import safe_open

        index = root / INDEX_FILE
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is malformed ({e}); re-download it") from None
            files = sorted(set(wmap.values()))
        elif (root / SINGLE_FILE).is_file():
            wmap, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{root} has no {SINGLE_FILE} or {INDEX_FILE}; download the weights")
        out: dict[str, TensorInfo] = {}
        for fname in files:
            f = root / fname
            if not f.is_file():
                raise CheckpointError(f"weight shard {f} listed in {INDEX_FILE} is missing; download it")
            try:
                with safe_open(str(f), framework="numpy"):
                    pass
                header, base = _read_header(f)
            except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
                raise CheckpointError(
                    f"{f} is truncated or corrupt ({str(e).splitlines()[0]}); re-download it"
                ) from None
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                tag = h["dtype"]
                if tag not in ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {tag}")
                if name in out:
                    raise CheckpointError(f"tensor {name} is stored twice ({out[name].file.name} and {fname})")
                s, e = h["data_offsets"]
                out[name] = TensorInfo(f, ST_DTYPES[tag], tuple(h["shape"]), base + s, e - s)
        if wmap is not None:
            for name, fname in wmap.items():
                if name not in out or out[name].file.name != Path(fname).name:
                    raise CheckpointError(f"{INDEX_FILE} maps {name} to {fname}, but that shard lacks it; re-download")
        return out

    # ---- tensor access ----
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in checkpoint {self.path}") from None

    def get(self, name: str) -> np.ndarray:
        """Load one tensor (bf16 widened to float32)."""
        info = self.tensor_info(name)
        try:
            if info.dtype == "bfloat16":
                n = int(np.prod(info.shape, dtype=np.int64))
                bits = np.fromfile(info.file, dtype="<u2", count=n, offset=info.offset)
                if bits.size != n:
                    raise OSError("short read")
                return bf16_bits_to_f32(bits).reshape(info.shape)
            h = self._handles.get(info.file)
            if h is None:
                from safetensors import safe_open

                h = self._handles[info.file] = safe_open(str(info.file), framework="numpy")
            return h.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {info.file} ({e}); re-download the file") from None

    def _module_of(self, name: str) -> str | None:
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            p = ".".join(parts[:k])
            if p in self.layers:
                return p
        return None

    def layer_tensors(self, path: str) -> dict[str, np.ndarray]:
        """The stored tensors of one quantized layer under their short names (`indices`, `centroids.weight`, ...)."""
        if path not in self.layers:
            raise CheckpointError(f"{path} is not a quantized layer of {self.path}")
        return {s: self.get(f"{path}.{s}") for s in SHORT_NAMES if f"{path}.{s}" in self._tensors}

    def dense_tensor_names(self) -> list[str]:
        """Every tensor that is not part of a quantized layer (embeddings, norms, lm_head, unquantized linears)."""
        return [n for n in self._tensors if self._module_of(n) is None]

    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files (and generation_config.json) present in the directory, for copying to a deploy dir."""
        return [self.path / f for f in TOKENIZER_FILE_NAMES if (self.path / f).is_file()]

    # ---- validation ----
    def validate(self, progress: bool = True) -> None:
        """Check every tensor against the configs; raise a one-line CheckpointError at the first problem."""
        by_module: dict[str, list[str]] = {p: [] for p in self.layers}
        for n in self._tensors:
            m = self._module_of(n)
            if m is not None:
                by_module[m].append(n[len(m) + 1 :])
        for path, cfg in tqdm(self.layers.items(), desc="validate", unit="layer", disable=not progress):
            self._validate_layer(path, cfg, by_module[path])
        self._validate_dense()
        for name in tqdm(self.dense_tensor_names(), desc="validate dense", unit="tensor", disable=not progress):
            self._validate_finite(name)
        self.validate_tokenizer_files()

    def _validate_finite(self, name: str) -> None:
        """A NaN/inf weight runs without error and makes the model emit garbage, so it is refused by name."""
        if self._tensors[name].dtype not in FLOAT_DTYPES:
            return
        a = self.get(name)
        for start in range(0, max(a.shape[0], 1) if a.ndim else 1, 4096):  # rows in blocks: bounded scratch
            block = a[start : start + 4096] if a.ndim else a
            if not np.isfinite(block).all():
                raise CheckpointError(f"dense tensor {name}: expected finite values, found NaN/inf; the checkpoint "
                                      "is corrupt: re-download or re-quantize it")

    def validate_tokenizer_files(self) -> None:
        """Every tokenizer file that is JSON must parse, and tokenizer.json must load as a tokenizer (the runtime's
        `tokenizers` reads it), so a corrupt file is named here rather than failing in convert or chat."""
        for f in self.tokenizer_files():
            if f.suffix != ".json":
                continue
            try:
                value = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f} is not valid JSON ({str(e).splitlines()[0]}); re-download it") from None
            if not isinstance(value, dict):
                raise CheckpointError(f"{f} must hold a JSON object, not {type(value).__name__}; re-download it")
        tok = self.path / "tokenizer.json"
        if tok.is_file():
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(str(tok))
            except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
                raise CheckpointError(f"{tok} is not a valid tokenizer ({str(e).splitlines()[0]}); "
                                      "re-download it") from None

    def _validate_layer(self, path: str, cfg: VPTQLayerConfig, stored: list[str]) -> None:
        spec = expected_tensors(cfg)
        for s in stored:
            if s not in spec:
                why = " (enable_perm is false)" if s == "perm" else ""
                raise CheckpointError(f"layer {path}: unexpected tensor {s!r}{why}; the file does not match its config")
        # the layer's float dtype: the checkpoint's torch_dtype if the layer uses it at all, else its centroids'
        floats = [self._tensors[f"{path}.{s}"].dtype for s, sp in spec.items() if sp.dtypes == (FLOAT,) and s in stored]
        fdt = self.dtype if self.dtype in floats else (floats[0] if floats else None)
        for s, sp in spec.items():
            if s not in stored:
                raise CheckpointError(f"layer {path}: tensor {s!r} missing, expected {sp.describe()}")
            info = self._tensors[f"{path}.{s}"]
            if sp.dtypes == (FLOAT,):
                ok = info.dtype in FLOAT_DTYPES and info.dtype == fdt
                want = f"{fdt if info.dtype in FLOAT_DTYPES else '/'.join(FLOAT_DTYPES)} {list(sp.shape)}"
            else:
                ok = info.dtype in sp.dtypes
                want = sp.describe()
            if not ok or info.shape != sp.shape:
                raise CheckpointError(
                    f"layer {path}: tensor {s!r} expected {want}, found {info.dtype} {list(info.shape)}"
                )
        leaf, lin = path.rsplit(".", 1)[1], self._linears.get(path)
        if lin is not None and cfg.bias != lin.bias:
            why = {"llama": "attention_bias/mlp_bias say", "qwen2": "qwen2 always has q/k/v biases, so"}
            raise CheckpointError(
                f"layer {path}: its VPTQ config says bias={cfg.bias} but {why.get(self.arch, self.arch + ' says')} "
                f"{leaf} {'has' if lin.bias else 'has no'} bias; fix config.json"
            )
        t = self.layer_tensors(path)
        if cfg.is_indice_packed and not padding_bits_clear(t["indices"], cfg):
            log.warning("layer %s: unused high bits of packed indices are not zero (ignored)", path)
        codes = decode_codes(cfg, t, path)
        checks = [("indices", codes.idx, cfg.num_centroids)]
        if codes.res is not None:
            checks.append(("indices" if cfg.is_indice_packed else "res_indices", codes.res, cfg.num_res_centroids))
        if codes.outlier_idx is not None:
            checks.append(("outlier_indices", codes.outlier_idx, cfg.num_outlier_centroids))
        for name, c, k in checks:
            if c.size and int(c.max()) >= k:
                raise CheckpointError(
                    f"layer {path}: tensor {name!r} expected codes < {k} (codebook size), found {int(c.max())}"
                )
        if codes.perm is not None:
            I = cfg.in_features
            p = codes.perm
            if p.min() < 0 or p.max() >= I or np.unique(p).size != I:
                raise CheckpointError(
                    f"layer {path}: tensor 'perm' expected a permutation of 0..{I - 1}, found values in "
                    f"[{int(p.min())}, {int(p.max())}] with {I - np.unique(p).size} repeats"
                )
        for s in ("centroids.weight", "res_centroids.weight", "outlier_centroids.weight", "weight_scale",
                  "weight_bias", "bias"):
            if s in t and not np.isfinite(t[s]).all():
                raise CheckpointError(f"layer {path}: tensor {s!r} expected finite values, found NaN/inf")

    def _validate_dense(self) -> None:
        for name, shape in required_dense(self.hf_config, set(self.layers)).items():
            if name not in self._tensors:
                hint = " (or set tie_word_embeddings)" if name == "lm_head.weight" else ""
                raise CheckpointError(f"dense tensor {name} missing, expected shape {list(shape)}{hint}")
            info = self._tensors[name]
            if info.shape != shape or info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"dense tensor {name}: expected float {list(shape)}, found {info.dtype} {list(info.shape)}"
                )

    def __repr__(self) -> str:
        return f"VPTQCheckpoint({str(self.path)!r}, arch={self.arch}, layers={len(self.layers)}, dtype={self.dtype})"
