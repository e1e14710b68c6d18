"""File names of an MLC model directory (docs/mlc-artifacts.md): the one place that spells them."""

CHAT_CONFIG = "mlc-chat-config.json"
TENSOR_CACHE = "tensor-cache.json"
SHARD_PREFIX = "params_shard_"  # params_shard_<N>.bin
