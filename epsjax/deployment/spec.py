"""The deployment spec and the request it is planned for, validated in one place (epsjax.deployment's docstring).

Every check that needs only the spec's own fields is here, in DeploymentSpec.__post_init__; a failure is a SpecError
(an EpsjaxError: `epsjax generate` prints it as one line, exit status 2) naming the field by its `epsjax generate`
flag (the fields are named after the flags), the value and what is allowed.
"""

from __future__ import annotations

import dataclasses

from epsjax import pallas_kernels, sharding
from epsjax.compilation import ShapeBuckets
from epsjax.errors import EpsjaxError

DEFAULT_PRESET = "tiny-deepseek-v2"
DTYPES = ("bfloat16", "float16", "float32")
STRATEGIES = ("auto", "local", "tp", "dp", "tp_ep", "dp_ep", "dep")
MESH_STRATEGIES = ("tp", "dp", "tp_ep", "dp_ep")
SPLITS = ("experts", "tokens")
QUANTIZATIONS = ("fp8",)
OFFLOAD_MODES = ("lru", "lfu", "expertflow")
DEP_SCHEDULES = ("findep", "pppipe", "naive")
PREDICTOR_DIR = "predictor"  # a checkpoint's routing predictor, if it ships one: <model>/predictor/
PREDICTOR_FILES = ("predictor_config.json", "predictor.safetensors")  # what RoutingPredictor.save writes


class SpecError(EpsjaxError):
    """A deployment spec that cannot be built as asked: the message names the field (as its `epsjax generate` flag),
    the value and what is allowed."""


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class DeploymentSpec:
    """What to deploy, validated as a whole.

    model / preset: a Hugging Face checkpoint directory, or a built-in config with random weights (default
        tiny-deepseek-v2 when neither is given).
    dtype: parameter dtype (default: the checkpoint's or the preset's).
    strategy: the rule set: local (one device), tp, dp, tp_ep, dp_ep (a mesh), dep (FinDEP attention and expert
        groups) or auto (dp_ep when the batch splits over several devices, else local).
    mesh: (data, tensor, expert) sizes for a mesh strategy (default: as much TP / EP as the model allows).
    pipeline_degree, split, backend: a forced EPS expert plan (default: the scheduler's); backend is also the one
        device's expert GEMM backend, and the DEP expert group's ("auto": the load-aware selector).
    transport: the EP all-to-all, auto | ragged | padded.
    quantize: "fp8" stores the routed experts as FP8 W8A8 (one device).
    offload: lru | lfu | expertflow keeps the routed experts in host memory and a device cache of offload_budget
        (a fraction in (0, 1] of the routed-expert bytes); expertflow forecasts routing with `predictor` (a
        directory RoutingPredictor.save wrote; default: the checkpoint's predictor/ directory). One device.
    dep_split, dep_schedule: with strategy dep, the attention and expert group sizes (default: half the devices
        each) and the schedule space of the FinDEP solver (default: findep).
    buckets, decode_chunk: the engine's shape ladders and decode steps per device call (None: the engine's default).
    allow_nonfinite: load checkpoint tensors holding NaN or Inf (with a warning).
    force: build even when the memory check (epsjax.deployment.memory) finds that the parameters and KV cache do not
        fit the devices or the host.
    """

    model: str | None = None
    preset: str | None = None
    dtype: str | None = None
    strategy: str = "auto"
    mesh: tuple[int, int, int] | None = None
    pipeline_degree: int | None = None
    split: str | None = None
    backend: str = "auto"
    transport: str = "auto"
    quantize: str | None = None
    offload: str | None = None
    offload_budget: float | None = None
    predictor: str | None = None
    dep_split: tuple[int, int] | None = None
    dep_schedule: str | None = None
    buckets: ShapeBuckets | None = ShapeBuckets()
    decode_chunk: int | None = None
    allow_nonfinite: bool = False
    force: bool = False

    def __post_init__(self):
        if self.model is not None and self.preset is not None:
            raise SpecError(f"--model {self.model} and --preset {self.preset} are two models; give one")
        if self.model is None and self.preset is None:
            object.__setattr__(self, "preset", DEFAULT_PRESET)
        if self.dtype not in (None, *DTYPES):
            raise SpecError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.strategy not in STRATEGIES:
            raise SpecError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.backend != "auto" and self.backend not in pallas_kernels.BACKENDS:
            raise SpecError(f"--backend must be auto or one of {', '.join(pallas_kernels.BACKENDS)}, got "
                            f"{self.backend!r}")
        if self.transport not in sharding.TRANSPORTS:
            raise SpecError(f"--transport must be one of {', '.join(sharding.TRANSPORTS)}, got {self.transport!r}")
        self._check_mesh_fields()
        self._check_dep_fields()
        self._check_one_device_fields()
        if self.buckets is not None and not isinstance(self.buckets, ShapeBuckets):
            raise SpecError(f"buckets must be a ShapeBuckets or None, got {type(self.buckets).__name__}")
        if self.decode_chunk is not None and not _positive_int(self.decode_chunk):
            raise SpecError(f"decode_chunk must be a positive int, got {self.decode_chunk!r}")

    def _check_mesh_fields(self) -> None:
        if self.mesh is not None:
            if (not isinstance(self.mesh, tuple) or len(self.mesh) != 3
                    or not all(_positive_int(n) for n in self.mesh)):
                raise SpecError(f"--mesh takes three positive data,tensor,expert sizes, got {self.mesh!r}")
            if self.strategy in ("local", "dep"):
                raise SpecError(f"--mesh shapes the mesh of a mesh strategy ({', '.join(MESH_STRATEGIES)}); "
                                f"--strategy {self.strategy} has none")
        if self.split is not None and self.split not in SPLITS:
            raise SpecError(f"--split takes experts or tokens (EPS pipeline stages), got {self.split!r}; attention,"
                            "expert group sizes such as 3,5 go with --strategy dep")
        if self.pipeline_degree is not None:
            if not _positive_int(self.pipeline_degree):
                raise SpecError(f"--pipeline-degree must be a positive int, got {self.pipeline_degree!r}")
            if self.strategy in ("local", "dep"):
                raise SpecError(f"--pipeline-degree forces the expert plan of a mesh strategy "
                                f"({', '.join(MESH_STRATEGIES)}); --strategy {self.strategy} has none")
        elif self.split is not None:
            raise SpecError(f"--split {self.split} shapes a forced EPS pipeline; add --pipeline-degree")

    def _check_dep_fields(self) -> None:
        if self.strategy != "dep":
            if self.dep_schedule is not None:
                raise SpecError("--schedule chooses a DEP schedule; add --strategy dep")
            if self.dep_split is not None:
                raise SpecError(f"--split {','.join(map(str, self.dep_split))}: attention,expert group sizes go "
                                "with --strategy dep")
            return
        if self.dep_schedule not in (None, *DEP_SCHEDULES):
            raise SpecError(f"--schedule must be one of {', '.join(DEP_SCHEDULES)}, got {self.dep_schedule!r}")
        if self.dep_split is not None and (not isinstance(self.dep_split, tuple) or len(self.dep_split) != 2
                                           or not all(_positive_int(n) for n in self.dep_split)):
            raise SpecError(f"--split with --strategy dep takes two positive attention,expert group sizes such as "
                            f"3,5, got {self.dep_split!r}")

    def _check_one_device_fields(self) -> None:
        """quantize and offload run on one device; offload takes float experts and a budget."""
        if self.quantize not in (None, *QUANTIZATIONS):
            raise SpecError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.quantize is not None and self.strategy == "dep":
            raise SpecError(f"--quantize {self.quantize} runs on one device for now; --strategy dep takes float "
                            "experts")
        if self.quantize is not None and (self.strategy in MESH_STRATEGIES or self.mesh is not None):
            raise SpecError(f"--quantize {self.quantize} runs on one device for now; add --strategy local")
        if self.offload is None:
            if self.offload_budget is not None:
                raise SpecError("--offload-budget sizes the device expert cache of --offload; add --offload "
                                f"{'|'.join(OFFLOAD_MODES)}")
            if self.predictor is not None:
                raise SpecError("--predictor forecasts routing for --offload expertflow; add it")
            return
        if self.offload not in OFFLOAD_MODES:
            raise SpecError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        budget = self.offload_budget
        if budget is None:
            raise SpecError(f"--offload {self.offload} needs --offload-budget FRACTION: the share of the routed "
                            "experts' bytes the device cache may hold, in (0, 1]")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise SpecError(f"--offload-budget must be a fraction of the routed-expert bytes in (0, 1], got "
                            f"{budget!r}")
        if self.strategy not in ("auto", "local") or self.mesh is not None or self.pipeline_degree is not None:
            what = (f"--strategy {self.strategy}" if self.strategy not in ("auto", "local") else
                    "--mesh" if self.mesh is not None else "--pipeline-degree")
            raise SpecError(f"--offload {self.offload} runs on one device (the host holds the routed experts, one "
                            f"device caches them); it does not combine with {what}: drop one, or use --strategy local")
        if self.quantize is not None:
            raise SpecError(f"--offload {self.offload} takes float experts; --quantize {self.quantize} runs without "
                            "offloading for now")
        if self.predictor is not None and self.offload != "expertflow":
            raise SpecError(f"--predictor forecasts routing for --offload expertflow, not --offload {self.offload}")


@dataclasses.dataclass(frozen=True)
class RequestShape:
    """The request a deployment is planned for: how many prompts, the longest prompt's tokens, new tokens. The
    strategy (auto), the batch shards, the scheduler's plan and the one-device GEMM backend follow from it."""

    batch: int = 1
    prompt_len: int = 16
    max_new_tokens: int = 16

    def __post_init__(self):
        for name in ("batch", "prompt_len", "max_new_tokens"):
            if not _positive_int(getattr(self, name)):
                raise SpecError(f"RequestShape.{name} must be a positive int, got {getattr(self, name)!r}")
