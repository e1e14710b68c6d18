"""vptq-mlc: ahead-of-time compiled deployment of VPTQ models (checkpoint -> convert -> compile -> runtime)."""

__version__ = "0.1.0"
