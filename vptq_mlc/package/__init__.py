"""package/: prebuilt model libraries for many GPUs (`vptq-mlc package CONFIG`), with a manifest that deploy hosts
use to pick and verify the library for their GPU (`select.py`, runtime-only)."""
