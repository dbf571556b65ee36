"""Optional compiled CPU kernels (XLA FFI custom calls built from `csrc/` on first use).

Nothing here is imported by the model at module level: `TransformerConfig.kernels` chooses them.
"""
