"""The expert plan: how the EP MoE layer is pipelined and which kernel each stage runs.

epsjax/scheduler fills it from its cost models (EPS-MoE's pipeline degree and kernel choice); until then the
default runs without a pipeline and lets the kernel selector choose, and a user can override it by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from epsjax import pallas_kernels
from epsjax.sharding.errors import PlanError

SPLITS = ("experts", "tokens")


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """pipeline_degree: PN stages (1 = no pipeline). Stage i's dispatch and combine are independent of stage
        i-1's expert GEMMs, so XLA may overlap them.
    split: "experts" gives each stage a group of every device's local experts (EPS-MoE; needs PN <= experts per
        device, groups differ in size by at most one); "tokens" gives each stage a chunk of every device's
        tokens, each chunk routed over all experts.
    backends: the pallas_kernels backend of each stage: one name for all stages or PN names.
    tilings: the kernel tiling object of each stage (1 or PN entries; None = the backend's default or table).
        Mosaic GPU tilings carry num_sms, which is how SMs are left to the collectives.
    """

    pipeline_degree: int = 1
    split: Literal["experts", "tokens"] = "experts"
    backends: tuple[str, ...] = ("auto",)
    tilings: tuple[object, ...] = (None,)

    def __post_init__(self):
        if not isinstance(self.pipeline_degree, int) or self.pipeline_degree < 1:
            raise PlanError(f"pipeline_degree must be a positive int, got {self.pipeline_degree!r}")
        if self.split not in SPLITS:
            raise PlanError(f"split must be one of {SPLITS}, got {self.split!r}")
        if isinstance(self.backends, str):
            object.__setattr__(self, "backends", (self.backends,))
        for name, value in (("backends", self.backends), ("tilings", self.tilings)):
            if len(value) not in (1, self.pipeline_degree):
                raise PlanError(f"{name} must have 1 or pipeline_degree={self.pipeline_degree} entries, "
                                 f"got {value!r}")
        bad = [b for b in self.backends if b != "auto" and b not in pallas_kernels.BACKENDS]
        if bad:
            raise PlanError(f"unknown backends {bad}; expected 'auto' or one of {pallas_kernels.BACKENDS}")

    def backend(self, stage: int) -> str:
        return self.backends[0] if len(self.backends) == 1 else self.backends[stage]

    def tiling(self, stage: int):
        return self.tilings[0] if len(self.tilings) == 1 else self.tilings[stage]

    def expert_groups(self, num_local_experts: int) -> tuple[tuple[int, int], ...]:
        """[start, end) of each stage's local experts: all of them for split="tokens"."""
        PN = self.pipeline_degree
        if self.split == "tokens":
            return ((0, num_local_experts),)
        if PN > num_local_experts:
            raise PlanError(f"a pipeline of {PN} expert groups needs at least {PN} experts per device, but there "
                             f"are {num_local_experts}; use split='tokens' or a smaller pipeline_degree")
        bounds = [s * num_local_experts // PN for s in range(PN + 1)]
        return tuple(zip(bounds[:-1], bounds[1:]))

    @property
    def token_chunks(self) -> int:
        """How many chunks each device's tokens are cut into (each is routed and dispatched on its own)."""
        return self.pipeline_degree if self.split == "tokens" else 1
