"""`vptq-mlc` command line. Each command is a thin wrapper: the work lives in the pipeline packages.

Imports of heavy modules (tvm.relax, torch) happen inside the commands so that `chat`/`serve` on a
deploy host with the runtime-only TVM never touch the compiler.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import click

from vptq_mlc.errors import VPTQMLCError

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


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="vptq-mlc")
def main(verbose: int) -> None:
    """Compile VPTQ models ahead of time and run them with the TVM runtime."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ---- commands (keep each one short; one section per pipeline stage) ----
