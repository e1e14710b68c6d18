"""Run a compiled model library: load it with its weights, schedule requests, sample, detokenize.

Imports only `tvm.runtime` (plus numpy, tokenizers, jinja2) so it works with a runtime-only TVM install.
"""

from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.request import Request, RequestState
from vptq_mlc.runtime.sampling import SamplingParams

__all__ = ["Engine", "Request", "RequestState", "SamplingParams"]
