"""Every error a user of epsjax can cause, by layer (all subclass EpsjaxError, itself a ValueError).

    EpsjaxError        the root: input epsjax cannot use (the `epsjax` command: one line, exit status 2)
    KernelError        pallas_kernels: a GEMM backend or tiling that cannot run here
    PlanError          sharding: a mesh, rule set, expert plan or transport that cannot run
    ConfigError        models: a model configuration or config.json field (named, with its value)
    CheckpointError    epsjax.checkpoint: checkpoint files and tensors (file and tensor named)
    RequestError       epsjax.engine: prompts, lengths, sampling parameters, decode steps
    SpecError          epsjax.deployment: a deployment spec (strategy, mesh, plan, quantization, offload) that cannot
                       be built as asked, named by its `epsjax generate` flag

The README's "Errors" table lists what each means and what to do.
"""

from epsjax.checkpoint import CheckpointError
from epsjax.deployment import SpecError
from epsjax.engine import RequestError
from epsjax.models.config import ConfigError
from epsjax.pallas_kernels.errors import EpsjaxError, KernelError
from epsjax.sharding.errors import PlanError

__all__ = ["CheckpointError", "ConfigError", "EpsjaxError", "KernelError", "PlanError", "RequestError", "SpecError"]
