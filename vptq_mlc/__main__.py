"""`python -m vptq_mlc ...` is the `vptq-mlc` command (useful where the console script is not on PATH)."""

from vptq_mlc.cli import main

main()
