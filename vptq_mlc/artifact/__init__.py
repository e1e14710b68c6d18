"""The model-directory contract shared by convert (writes it), compile, runtime and the kernels (read it): file
names, the chat config, the tensor cache, the VQ layout table (operand names, order, shapes, code dtypes) and the
argument layout of the library's `sample_tokens` (sampler_abi.py).
Pure Python + numpy: no TVM import, so every stage, runtime-only hosts included, can read it."""
