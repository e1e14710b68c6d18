"""convert/: VPTQ checkpoint -> MLC model directory (tensor cache in the kernel layout + mlc-chat-config.json)."""
