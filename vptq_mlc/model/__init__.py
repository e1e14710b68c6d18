"""Model architectures. `archs.py` maps each HF config onto `DecoderConfig` (no TVM compiler needed, so `convert`
runs on runtime-only hosts); `builder.py` makes the nn.Module tree (needs tvm.relax); `decoder.py` is the tree."""
