"""`vptq-mlc bench`: per-kernel timings and end-to-end decode on CUDA (see bench/RESULTS.md)."""
