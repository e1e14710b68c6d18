"""Model architectures' compute graphs. The registry (checkpoint/arch.py: config parsing, linears, biases, honoured
HF fields) needs no TVM compiler; `builder.py` makes the registry entry's nn.Module tree (needs tvm.relax);
`decoder.py` is the tree Llama, Mistral and Qwen2 share."""
