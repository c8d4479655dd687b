"""Hand-written GPU kernels that the built-in plugins can route to. Each has a plain-PyTorch reference (used on
other devices and by the tests) and imports Triton only when a CUDA tensor first needs it."""

import importlib.util

import torch

# Whether a Triton kernel can be traced into a compiled graph here: torch with `torch.library.triton_op` and Triton
# installed. Decided once at import: the check runs inside traced code (the decode step's attention), where a
# module lookup per call is work dynamo would have to trace on every compile.
TRITON_OPS = hasattr(torch.library, "triton_op") and importlib.util.find_spec("triton") is not None
