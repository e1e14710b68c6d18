"""Device strings ("cpu", "cuda:1", "auto", ...) -> `DeviceSpec` / `Placement` -> a present `tvm.runtime.Device`.

`parse_placement` is the one place `--device` / `--devices` text becomes typed: the CLI calls it once, at its edge,
and passes the `Placement` down; library users may still hand the runtime a string, which goes through the same
parser (`as_device`).

Why a module of its own: in runtime-only mode (TVM_USE_RUNTIME_LIB=1, or a TVM install without
libtvm_compiler.so) TVM skips loading its GPU backend plugins, so the CUDA plugin has to be loaded by hand
before a CUDA model library can be loaded (docs/gpu-aot.md §2); ROCm needs our own runtime library
(`runtime/rocm.py`) in every mode. Everything device-specific sits here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tvm

from vptq_mlc.errors import RuntimeLoadError

log = logging.getLogger(__name__)

# kind -> DLPack device type (what vm_initialization and the tensor cache loader take).
DEVICE_TYPES = {"cpu": 1, "cuda": 2, "rocm": 10}
# kind -> words a model library's file name may carry for that kind (see `find_library`).
LIBRARY_NAME_TAGS = {"cpu": ("cpu", "llvm"), "cuda": ("cuda", "sm"), "rocm": ("rocm", "hip", "gfx")}
_SPEC = re.compile(r"^(cpu|cuda|rocm)(?::(\d+))?$")


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed device string: `kind` in DEVICE_TYPES and an ordinal."""

    kind: str
    index: int = 0

    @property
    def dlpack_type(self) -> int:
        return DEVICE_TYPES[self.kind]

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" and self.index == 0 else f"{self.kind}:{self.index}"


# A device as the runtime's functions take it: a DeviceSpec, None for "auto" (the first present of cuda, rocm, cpu),
# or a device string for Python callers (parsed by `parse_device`).
DeviceLike = DeviceSpec | str | None


def parse_device(text: str) -> DeviceSpec | None:
    """Parse a device string; None means "auto". Raises RuntimeLoadError for anything else."""
    t = text.strip().lower()
    if t == "auto":
        return None
    m = _SPEC.match(t)
    if not m:
        raise RuntimeLoadError(f"unknown device {text!r}; use cpu, cuda, cuda:N, rocm:N or auto")
    return DeviceSpec(m.group(1), int(m.group(2) or 0))


def as_device(device: DeviceLike) -> DeviceSpec | None:
    """A DeviceSpec (or None = auto) as is; a string through `parse_device`."""
    return parse_device(device) if isinstance(device, str) else device


def parse_devices(text: str | Sequence[str | DeviceSpec]) -> tuple[DeviceSpec, ...]:
    """`"cuda:0,cuda:1"` (or a list) -> DeviceSpecs; one kind, explicit devices (no `auto`)."""
    items = [t.strip() if isinstance(t, str) else t for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    if not items:
        raise RuntimeLoadError("--devices is empty; list devices like cuda:0,cuda:1")
    specs = []
    for t in items:
        spec = as_device(t)
        if spec is None:
            raise RuntimeLoadError("--devices takes explicit devices (e.g. cuda:0,cuda:1), not auto")
        specs.append(spec)
    if len({s.kind for s in specs}) > 1:
        raise RuntimeLoadError(f"--devices mixes device kinds ({','.join(map(str, items))}); a library runs on one "
                               "kind")
    return tuple(specs)


@dataclass(frozen=True)
class Placement:
    """Where a model runs: no device = auto, one device, or several (the decoder layers split over them,
    runtime/split.py). Made by `parse_placement`."""

    devices: tuple[DeviceSpec, ...] = ()

    @property
    def split(self) -> bool:
        return len(self.devices) > 1

    @property
    def first(self) -> DeviceSpec | None:
        """The device that picks the library (and the only one unless split); None = auto."""
        return self.devices[0] if self.devices else None

    def __str__(self) -> str:
        return ",".join(map(str, self.devices)) or "auto"


def parse_placement(device: DeviceLike | Placement = "auto",
                    devices: str | Sequence[str | DeviceSpec] | None = None) -> Placement:
    """`--device` and `--devices` -> a Placement (`devices`, when given, overrides `device`; one entry is that
    single device). A single `cpu:N` other than cpu:0 is refused: see `_check_single`."""
    if isinstance(device, Placement) and not devices:
        return device
    specs = parse_devices(devices) if devices else ()
    if len(specs) > 1:
        return Placement(specs)
    single = specs[0] if specs else as_device(device)  # type: ignore[arg-type]
    _check_single(single, device if isinstance(device, str) and not specs else str(single))
    return Placement(() if single is None else (single,))


def runtime_only() -> bool:
    """True when TVM was imported without its compiler library (GPU plugins are then not auto-loaded)."""
    return bool(getattr(tvm.base, "_RUNTIME_ONLY", False))


def _load_cuda_plugin() -> str | None:
    """Load libtvm_runtime_cuda by hand if nothing registered CUDA yet. Returns why it failed, or None."""
    if tvm.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return None
    from tvm_ffi.libinfo import load_lib_ctypes

    rt_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=[rt_dir]
        )
    except (OSError, RuntimeError) as e:  # no driver / no libcudart.so.13 on this host
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    log.info("loaded libtvm_runtime_cuda by hand (runtime-only TVM)")
    return None


def _present(spec: DeviceSpec) -> tuple[bool, str]:
    """Whether the device exists, and if not, a short reason."""
    if spec.kind == "cpu":
        return True, ""
    if spec.kind == "cuda":
        why = _load_cuda_plugin()
        if why is not None:
            return False, f"TVM's CUDA runtime plugin could not load ({why})"
    elif tvm.get_global_func("device_api.rocm", allow_missing=True) is None:
        from vptq_mlc.runtime.rocm import load_rocm_runtime  # the wheel has no ROCm runtime: ours registers it

        try:
            load_rocm_runtime()
        except RuntimeLoadError as e:
            return False, str(e)
    try:
        exists = bool(tvm.runtime.device(spec.kind, spec.index).exist)
    except Exception as e:  # noqa: BLE001 - a driver error means the device is unusable
        return False, f"the driver reported {str(e).splitlines()[0]}"
    return exists, "" if exists else f"no {spec.kind} device with index {spec.index}"


def resolve_device(device: DeviceLike = "auto") -> tuple[DeviceSpec, tvm.runtime.Device]:
    """The spec and a TVM device that is present; "auto" (None) prefers cuda, rocm, cpu."""
    spec = as_device(device)
    if spec is None:
        for cand in (DeviceSpec("cuda"), DeviceSpec("rocm")):
            if _present(cand)[0]:
                spec = cand
                break
        else:
            spec = DeviceSpec("cpu")
        log.info("device auto -> %s", spec)
    ok, why = _present(spec)
    if not ok:
        raise RuntimeLoadError(f"device {spec} is not available: {why}; pick another with --device (e.g. cpu)")
    return spec, tvm.runtime.device(spec.kind, spec.index)


def find_library(model_dir: Path, spec: DeviceSpec) -> Path:
    """The model library to use when none was given: the newest `*.so` in `model_dir` for this device kind.

    Rule: a file matches a kind when one of the words of its name (split on `-`, `_`, `.`; digits dropped,
    so `sm90` -> `sm`, `gfx942` -> `gfx`) is a tag of that kind: cpu: cpu, llvm; cuda: cuda, sm;
    rocm: rocm, hip, gfx. Among the matches the newest (mtime) wins.
    """
    libs = sorted(Path(model_dir).glob("*.so"))
    tags = LIBRARY_NAME_TAGS[spec.kind]

    def words(p: Path) -> set[str]:
        return {re.sub(r"\d+", "", w) for w in re.split(r"[-_.]", p.stem.lower())}

    matches = [p for p in libs if words(p) & set(tags)]
    if not matches:
        found = ", ".join(p.name for p in libs) or "no *.so files"
        raise RuntimeLoadError(
            f"no {spec.kind} model library in {model_dir} (found: {found}); build one with "
            f"`{compile_command(model_dir, spec.kind)}`, or pass --lib PATH, or name the file with one of: "
            f"{', '.join(tags)}"
        )
    return max(matches, key=lambda p: p.stat().st_mtime)


def _check_single(spec: DeviceSpec | None, text: str) -> None:
    """Refuse a single device that names no real device, before anything loads.

    TVM accepts any `cpu:N` and runs it on the one host CPU, so `cpu:7` would silently mean `cpu`. Only `cpu`
    (= `cpu:0`) is accepted for one device; distinct `cpu:N` ids are meaningful only in a layer split
    (`--devices cpu:0,cpu:1`, how the split is tested without GPUs)."""
    if spec is not None and spec.kind == "cpu" and spec.index != 0:
        raise RuntimeLoadError(f"device {text!r} does not exist: the host's CPU is one device; use --device cpu")


COMPILE_TARGETS = {"cpu": "llvm", "cuda": "cuda", "rocm": "rocm --arch GFX_ARCH"}


def compile_command(model_dir: Path, kind: str) -> str:
    """The command that builds a model library for device `kind` into `model_dir` (named so `find_library` finds
    it): what to suggest when a converted dir has no library yet."""
    return f"vptq-mlc compile {model_dir} --target {COMPILE_TARGETS[kind]}"
