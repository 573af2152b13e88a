"""Expert GEMM kernels: GroupGemm, DenseGemm, fused expert FFN, and the selector.

    group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               backend="auto", tiling=None, interpret=False) -> [M, N]
    expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, ...) -> [M, D]
    select_backend(...) -> Choice(backend, tiling, reason)

Semantics (shared by every backend) are documented in :mod:`pallas_kernels.semantics`.
"""

from epsjax.pallas_kernels.api import expert_ffn, group_gemm
from epsjax.pallas_kernels.chunked_gemm import ChunkTiling
from epsjax.pallas_kernels.dense_gemm import DenseTiling
from epsjax.pallas_kernels.errors import EpsjaxError, KernelError
from epsjax.pallas_kernels.group_gemm_mgpu import MosaicTiling
from epsjax.pallas_kernels.group_gemm_triton import TritonTiling
from epsjax.pallas_kernels.selector import BACKENDS, Choice, select_backend
from epsjax.pallas_kernels.semantics import expert_ffn_reference, group_gemm_reference

__all__ = [
    "BACKENDS", "ChunkTiling", "EpsjaxError", "KernelError", "Choice", "DenseTiling", "MosaicTiling", "TritonTiling", "expert_ffn", "expert_ffn_reference", "group_gemm",
    "group_gemm_reference", "select_backend",
]
