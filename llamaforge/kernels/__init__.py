"""Hand-written GPU kernels that the built-in plugins can route to. Each has a plain-PyTorch reference (used on
other devices and by the tests) and imports Triton only when a CUDA tensor first needs it."""
