"""`vptq-mlc bench ...`: build kernel libraries on the build box; check and time them on a CUDA host.

Heavy imports (tvm compiler, torch) happen inside the commands: `bench kernels/check/decode` run on a GPU host
with the runtime-only TVM bundle + torch; `bench build` needs the compiler and nvcc but no GPU.
"""

from __future__ import annotations

import json
import logging
import sys

import click

log = logging.getLogger(__name__)


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; cols = (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) for k, _, f in cols) + " |")
    return "\n".join(lines)


@click.group()
def bench() -> None:
    """Kernel correctness and speed on CUDA (build here, run on the GPU host)."""


@bench.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--suite", type=click.Choice(["check", "kernels", "sweep", "code-sorted", "prefill", "mma-wide",
                                               "register-tiles", "cta-splits"]),
              default="kernels",
              show_default=True,
              help="check: every variant family on small shapes; kernels: the issue's variants x real shapes; "
                   "sweep: decode-kernel schedule variants on a few shapes; code-sorted: the K=65536 kernel "
                   "(correctness, real shapes next to the gather GEMV, launch sweep); prefill: the dlight dequant "
                   "matmul, the registry's prefill kernel and both fp16 prefill paths forced (mma: VQ tensor "
                   "cores; dequant-gemm: dequantize + dense GEMM) at 128/512/2048 rows; mma-wide: the whole-entry "
                   "tensor-core decode kernel next to the current one on the 7B shapes at 8/16 rows; register-tiles: "
                   "its A fragments built in registers next to the registry's choice at 1/8/16 rows; cta-splits: "
                   "the two-launch o_proj / down_proj of the 7B shape, tile form vs register fragments over CTA "
                   "splits (launch-shape variants), at 8/16 rows.")
@click.option("--arch", default="sm_90", show_default=True, help="Comma-separated CUDA archs.")
@click.option("--rows", default="1,8", show_default=True, help="Decode row counts (kernels suite).")
@click.option("--compare-gemv", default="", help="Row counts at which the gather GEMV is also built, next to the "
                                                   "registry's choice (kernels suite), e.g. 4,8.")
def build(out: str, suite: str, arch: str, rows: str, compare_gemv: str) -> None:
    """Compile the suite's kernels into OUT/kernels_cuda.so + OUT/kernels.json (no GPU needed)."""
    from vptq_mlc.bench.kernels import (
        bench_cases,
        build_kernel_library,
        code_sorted_cases,
        correctness_cases,
        cta_split_cases,
        mma_wide_cases,
        prefill_cases,
        register_tile_cases,
        sweep_cases,
    )
    from vptq_mlc.compile.cuda import parse_archs

    if suite == "check":
        cases = correctness_cases()
    elif suite == "sweep":
        cases = sweep_cases()
    elif suite == "code-sorted":
        cases = code_sorted_cases()
    elif suite == "prefill":
        cases = prefill_cases()
    elif suite == "mma-wide":
        cases = mma_wide_cases()
    elif suite == "register-tiles":
        cases = register_tile_cases()
    elif suite == "cta-splits":
        cases = cta_split_cases()
    else:
        cases = bench_cases(tuple(int(r) for r in rows.split(",")),
                            tuple(int(r) for r in compare_gemv.split(",") if r))
    path = build_kernel_library(cases, out, parse_archs(arch.split(",")))
    click.echo(f"{len(cases)} kernels -> {path}")


@bench.command()
@click.argument("art", type=click.Path(file_okay=False, exists=True, path_type=str))
@click.option("--json", "json_out", type=click.Path(path_type=str), default=None, help="Also write results here.")
def check(art: str, json_out: str | None) -> None:
    """Each kernel of ART vs `x @ dequantize(W).T + bias` (fresh random layers); exit 1 on a failure."""
    from vptq_mlc.bench.kernels import check_kernels

    res = check_kernels(art)
    click.echo(_table(res, [("case", "case", "s"), ("rel_err", "max row rel. L2 error", ".2e"), ("ok", "ok", "")]))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)
    bad = [r["case"] for r in res if not r["ok"]]
    for r in res:
        if "error" in r:
            click.echo(f"{r['case']}: {r['error']}")
    click.echo(f"{len(res) - len(bad)}/{len(res)} kernels correct")
    if bad:
        sys.exit(1)


@bench.command()
@click.argument("art", type=click.Path(file_okay=False, exists=True, path_type=str))
@click.option("--reps", type=int, default=50, show_default=True, help="Timed calls per kernel (median).")
@click.option("--json", "json_out", type=click.Path(path_type=str), default=None, help="Also write results here.")
def kernels(art: str, reps: int, json_out: str | None) -> None:
    """Time every kernel of ART with a cold L2 next to torch fp16 matmul of the same shape."""
    from vptq_mlc.bench.kernels import time_kernels

    res = time_kernels(art, reps)
    click.echo(f"device: {res['device']}; copy bandwidth {res['copy_GBps']:.0f} GB/s (read+write); "
               f"L2 flush: {res['flush']}")
    click.echo(_table(res["rows"], [("variant", "variant", "s"), ("shape", "out x in", "s"), ("rows", "rows", "d"),
                                    ("kernel", "kernel", "s"), ("us", "ours us", ".1f"), ("fp16_us", "fp16 us", ".1f"),
                                    ("speedup_vs_fp16", "fp16/ours", ".2f"), ("bytes", "bytes", ",d"),
                                    ("pct_copy_bw", "% copy BW", ".1f"), ("rel_err", "max row rel. err", ".1e")]))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)


@bench.command()
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=str))
@click.option("--lib", required=True, type=click.Path(dir_okay=False, exists=True, path_type=str))
@click.option("--device", default="cuda", show_default=True)
@click.option("--tokens", type=int, default=32, show_default=True, help="Greedy tokens to generate.")
@click.option("--prompt-len", type=int, default=16, show_default=True, help="Prompt tokens (ids 1..n).")
@click.option("--compare-lib", type=click.Path(dir_okay=False, exists=True, path_type=str), default=None,
              help="Another library (e.g. the CPU one): its greedy tokens must be identical.")
@click.option("--compare-device", default="cpu", show_default=True)
def decode(model_dir: str, lib: str, device: str, tokens: int, prompt_len: int, compare_lib: str | None,
           compare_device: str) -> None:
    """Greedy decode through the library's `decode` (batch 1): tok/s, and token equality with --compare-lib."""
    from vptq_mlc.bench.e2e import greedy_decode

    prompt = list(range(1, prompt_len + 1))
    run = greedy_decode(model_dir, lib, device, prompt, tokens)
    click.echo(f"{device}: decode {run.decode_tok_s:.1f} tok/s ({run.decode_ms_per_tok:.3f} ms/token), "
               f"prefill {prompt_len} tokens {run.prefill_s * 1e3:.1f} ms")
    click.echo(f"tokens: {run.tokens}")
    if compare_lib:
        ref = greedy_decode(model_dir, compare_lib, compare_device, prompt, tokens)
        same = ref.tokens == run.tokens
        click.echo(f"{compare_device} tokens: {ref.tokens}")
        click.echo(f"identical greedy tokens ({tokens}): {same}")
        if not same:
            sys.exit(1)


@bench.command(name="synth-model")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--shape", type=click.Choice(["llama2-7b", "llama3.1-8b", "qwen2.5-7b", "llama2-13b", "llama3.1-405b"]),
              default="llama2-7b", show_default=True)
@click.option("--variant", default="v8-k4096-0", show_default=True)
@click.option("--layers", type=int, default=None, help="Decoder layers (default: the real model's).")
@click.option("--config-only", is_flag=True, help="No weights: enough to compile the library on a build box.")
@click.option("--context-window", type=int, default=2048, show_default=True)
def synth_model_cmd(out: str, shape: str, variant: str, layers: int | None, config_only: bool,
                    context_window: int) -> None:
    """Write a converted synthetic model with a real model's shapes (random, seeded weights)."""
    from vptq_mlc.bench.synth import synth_model

    click.echo(str(synth_model(out, shape, variant, layers=layers, config_only=config_only,
                               context_window=context_window)))


@bench.command(name="random-weights")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=str))
@click.option("--lib", required=True, type=click.Path(dir_okay=False, exists=True, path_type=str))
@click.option("--device", default="cuda", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def random_weights_cmd(model_dir: str, lib: str, device: str, seed: int) -> None:
    """Fill a config-only model dir with random weights for every parameter LIB declares (speed benchmarks)."""
    from vptq_mlc.bench.random_weights import write_random_weights
    from vptq_mlc.runtime.library import load_library

    params = load_library(lib, device).metadata["params"]
    click.echo(f"wrote {write_random_weights(model_dir, params, seed) / 1e9:.2f} GB of random weights to {model_dir}")


# `bench e2e` (issue 10 item 5(b)) lives in its own module; it imports only click and the stdlib at module level
from vptq_mlc.bench.e2e_suite import e2e_cmd as _e2e  # noqa: E402

bench.add_command(_e2e)


@bench.command(name="api")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=str))
@click.option("--lib", required=True, type=click.Path(dir_okay=False, exists=True, path_type=str))
@click.option("--device", default="cuda", show_default=True)
@click.option("--json", "json_out", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="Write the results here.")
@click.option("--batches", default="1,16", show_default=True, help="Engine-vs-server batch sizes.")
@click.option("--prompt-tokens", type=click.IntRange(1), default=32, show_default=True,
              help="Prompt of each engine-vs-server request.")
@click.option("--decode-tokens", type=click.IntRange(3), default=128, show_default=True,
              help="Tokens each engine-vs-server request generates (EOS ignored).")
@click.option("--prefix-tokens", type=click.IntRange(16), default=1024, show_default=True,
              help="The shared prefix of the time-to-first-token requests.")
@click.option("--items", type=click.IntRange(2), default=200, show_default=True,
              help="Length of the structured request's JSON array (fixes its token count).")
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True, help="Repeats of each measure (median).")
@click.option("--max-total-tokens", type=click.IntRange(1), default=None,
              help="KV slots of the engine and the server (default: what every phase needs).")
@click.option("--default-sampling/--no-default-sampling", default=True, show_default=True,
              help="Also compare structured and free output with the model's default sampling (not only greedy).")
@click.option("--work-dir", type=click.Path(file_okay=False, exists=True, path_type=str), default=None,
              help="Where random weights are written for a config-only MODEL_DIR (removed afterwards).")
@click.option("--exact-random", is_flag=True, help="Draw every random float instead of repeating a random block.")
def api_cmd(model_dir: str, lib: str, device: str, json_out: str, batches: str, prompt_tokens: int,
            decode_tokens: int, prefix_tokens: int, items: int, reps: int, max_total_tokens: int | None,
            default_sampling: bool, work_dir: str | None, exact_random: bool) -> None:
    """What the OpenAI server costs: structured vs free tok/s (batch 1), TTFT with a cached prefix, server vs
    engine tok/s; one JSON and a table (random weights fill a config-only MODEL_DIR)."""
    from vptq_mlc.bench.api import TILE, Settings, report_table, run_api_bench
    from vptq_mlc.errors import VPTQMLCError

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise click.BadParameter(f"--batches {batches!r}: give comma-separated integers, e.g. 1,16") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"--batches {batches!r}: every batch size must be >= 1")
    settings = Settings(sizes, prompt_tokens, decode_tokens, prefix_tokens, items, reps, max_total_tokens,
                        default_sampling)
    try:
        res = run_api_bench(model_dir, lib, device, json_out, settings, work_dir, 0 if exact_random else TILE)
    except (ValueError, RuntimeError, VPTQMLCError) as e:  # bad sizes, or a request or the server failed
        raise click.ClickException(str(e)) from None
    click.echo(report_table(res))


@bench.command(name="sampler")
@click.option("--vocab", default=128256, show_default=True, type=int, help="Vocabulary size (Llama 3.x: 128256).")
@click.option("--batch", "batches", default="1,16", show_default=True, help="Comma-separated rows per step.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--temperature", default=0.7, show_default=True, type=float)
@click.option("--top-p", default=0.9, show_default=True, type=float)
@click.option("--repeats", default=20, show_default=True, type=int)
@click.option("--json", "json_out", type=click.Path(path_type=str), default=None, help="Also write results here.")
@click.option("--lib", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Time this library's sample_tokens (a model library, or one --build wrote) instead of compiling "
                   "it (runtime-only hosts).")
@click.option("--build", "build_out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Only compile the sampler alone for --device's kind (no GPU needed) into this file, for --lib.")
@click.option("--arch", default=None, help="With --build: the CUDA arch (e.g. sm_90), as `compile --arch`.")
def sampler_cmd(vocab: int, batches: str, device: str, temperature: float, top_p: float, repeats: int,
                json_out: str | None, lib: str | None, build_out: str | None, arch: str | None) -> None:
    """Milliseconds per decode step that sampling takes: the compiled sampler vs numpy on the host.

    \b
    On a GPU host with a runtime-only TVM, build on the build box, then time there:
      vptq-mlc bench sampler --build sampler-cuda.so --device cuda --arch sm_90
      vptq-mlc bench sampler --lib sampler-cuda.so --device cuda:0 --vocab 128256 --batch 1,16
    Every logits profile (peaked, flat, random_model: bench e2e's random weights) is timed at every batch."""
    from vptq_mlc.bench.sampler import bench_sampler, build_sampler_library

    if build_out:
        build_sampler_library(build_out, device, arch)
        click.echo(f"wrote {build_out}")
        return
    res = bench_sampler(vocab, [int(b) for b in batches.split(",")], device, temperature, top_p, repeats, lib=lib)
    click.echo(_table(res, [("profile", "logits", "s"), ("batch", "batch", "d"),
                            ("device_sampled_ms", f"compiled T={temperature} top_p={top_p} ms", ".2f"),
                            ("device_greedy_ms", "compiled greedy ms", ".2f"),
                            ("host_greedy_ms", "copy + np.argmax ms", ".2f"),
                            ("added_ms", "added vs argmax ms", ".2f"),
                            ("host_sampled_ms", "numpy sampler ms", ".1f"), ("load_avg_1m", "load (1 min)", ".1f")]))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(res, f, indent=1)
