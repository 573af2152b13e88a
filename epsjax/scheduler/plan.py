"""The scheduler's plan: what the EP MoE layer runs, and its conversion to sharding.plan.ExpertPlan.

`Plan` carries what the search decides: the pipeline degree PN, how stages are cut (by local experts or by token
chunks), the GEMM backend and tiling of each stage, and the SMs left to communication. `to_expert_plan()` gives
the object sharding/ep_moe.py consumes (the SM split travels in the Mosaic GPU stages' tilings).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from epsjax.pallas_kernels.selector import tiling_from_dict
from epsjax.scheduler.errors import ScheduleError
from epsjax.sharding.plan import ExpertPlan

SPLITS = ("experts", "tokens")
Tiling = tuple[tuple[str, object], ...]  # hashable tiling fields, e.g. (("capacities", (2048,)),)


@dataclasses.dataclass(frozen=True)
class Plan:
    """pipeline_degree: PN stages (1 = no pipeline).
    split: "experts" (stage s = the s-th group of every device's local experts, EPS-MoE) or "tokens" (stage u =
        the u-th chunk of every device's tokens, routed over all experts).
    backends: pallas_kernels backend per stage (1 name for all stages, or PN names).
    tilings: tiling fields per stage (1 or PN entries; None = the backend's default). DenseGemm stages carry
        their capacity buckets; Mosaic GPU stages carry num_sms = SMs - sm_for_comm.
    sm_for_comm: SMs reserved for the all-to-all kernels while expert GEMMs run on the others; 0 = nothing
        reserved, so communication and computation do not overlap (the unpipelined baseline).
    """

    pipeline_degree: int = 1
    split: Literal["experts", "tokens"] = "experts"
    backends: tuple[str, ...] = ("auto",)
    tilings: tuple[Tiling | None, ...] = (None,)
    sm_for_comm: int = 0

    def __post_init__(self):
        if not isinstance(self.pipeline_degree, int) or self.pipeline_degree < 1:
            raise ScheduleError(f"pipeline_degree must be a positive int, got {self.pipeline_degree!r}")
        if self.split not in SPLITS:
            raise ScheduleError(f"split must be one of {SPLITS}, got {self.split!r}")
        if isinstance(self.backends, str):
            object.__setattr__(self, "backends", (self.backends,))
        for name, value in (("backends", self.backends), ("tilings", self.tilings)):
            if len(value) not in (1, self.pipeline_degree):
                raise ScheduleError(f"{name} must have 1 or pipeline_degree={self.pipeline_degree} entries, "
                                    f"got {value!r}")
        if not isinstance(self.sm_for_comm, int) or self.sm_for_comm < 0:
            raise ScheduleError(f"sm_for_comm must be an int >= 0, got {self.sm_for_comm!r}")

    def backend(self, stage: int) -> str:
        return self.backends[0] if len(self.backends) == 1 else self.backends[stage]

    def tiling(self, stage: int) -> dict | None:
        t = self.tilings[0] if len(self.tilings) == 1 else self.tilings[stage]
        return None if t is None else dict(t)

    def expert_groups(self, local_experts: int) -> tuple[tuple[int, int], ...]:
        """[start, end) local experts of each stage, exactly as the runtime's ExpertPlan splits them."""
        return ExpertPlan(self.pipeline_degree, self.split).expert_groups(local_experts)

    @property
    def token_chunks(self) -> int:
        return ExpertPlan(self.pipeline_degree, self.split).token_chunks

    def describe(self) -> str:
        backends = self.backends[0] if len(set(self.backends)) == 1 else ",".join(self.backends)
        return (f"PN={self.pipeline_degree} split={self.split} backends={backends} "
                f"sm_for_comm={self.sm_for_comm}")

    def as_dict(self) -> dict:
        return {"pipeline_degree": self.pipeline_degree, "split": self.split, "backends": list(self.backends),
                "tilings": [None if t is None else {k: v for k, v in t} for t in self.tilings],
                "sm_for_comm": self.sm_for_comm}

    # The runtime's object -------------------------------------------------------------------------------------------

    def to_expert_plan(self) -> ExpertPlan:
        """The sharding.plan.ExpertPlan of this plan. The SM split reaches the kernels through the stages' tilings
        (MosaicTiling.num_sms); XLA's collectives cannot be pinned to SMs from JAX."""
        return ExpertPlan(pipeline_degree=self.pipeline_degree, split=self.split, backends=tuple(self.backends),
                          tilings=tuple(None if t is None else tiling_from_dict(self.backend(i), dict(t))
                                        for i, t in enumerate(self.tilings)))
