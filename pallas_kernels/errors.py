"""KernelError: an expert GEMM backend, tiling or operand the kernels cannot run (the root is epsjax.errors)."""

from epsjax.errors import EpsjaxError


class KernelError(EpsjaxError):
    """An expert GEMM backend, tiling or operand the kernels cannot run (e.g. a GPU backend without a GPU)."""


__all__ = ["EpsjaxError", "KernelError"]  # EpsjaxError: re-exported, as before the root moved to epsjax.errors
