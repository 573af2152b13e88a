"""Backend selection (placeholder: ragged_dot everywhere until tables exist)."""

from __future__ import annotations

import dataclasses

BACKENDS = ("reference", "ragged_dot")


@dataclasses.dataclass(frozen=True)
class Choice:
  backend: str
  tiling: object = None
  reason: str = ""


def select_backend(*, tokens_per_expert, num_experts, k, n, dtype, op="group_gemm", device_kind=None):
  del tokens_per_expert, num_experts, k, n, dtype, op, device_kind
  return Choice("ragged_dot", None, "placeholder")
