"""compile/: MLC model directory + target -> AOT model library (.so)."""
