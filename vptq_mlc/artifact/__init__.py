"""The model-directory contract shared by convert (writes it), compile, runtime and the kernels (read it): file
names, the chat config, the tensor cache, and the VQ layout table (operand names, order, shapes, code dtypes).
Pure Python + numpy: no TVM import, so every stage, runtime-only hosts included, can read it."""
