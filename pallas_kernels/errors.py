"""The root of the errors a user of epsjax can cause (bad input, not bugs).

Each layer raises its own subclass, named for what was wrong: pallas_kernels.KernelError (a backend or tiling that
cannot run here), sharding.PlanError (a mesh, rule set, plan or transport), models.ConfigError (a model
configuration or config.json field), epsjax.checkpoint.CheckpointError (checkpoint files and tensors) and
epsjax.engine.RequestError (a request: prompts, lengths, sampling). The `epsjax` command prints any of them as one
line and exits with status 2; anything else is a bug and keeps its traceback. It lives here, in the lowest layer,
so that every layer can subclass it (epsjax.errors gathers them all).
"""


class EpsjaxError(ValueError):
    """Input epsjax cannot use; the message names what, the value seen and what is allowed."""


class KernelError(EpsjaxError):
    """An expert GEMM backend, tiling or operand the kernels cannot run (e.g. a GPU backend without a GPU)."""
