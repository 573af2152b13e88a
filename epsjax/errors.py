"""The root of every error a user of epsjax can cause (bad input, not bugs): EpsjaxError, a ValueError.

This module imports nothing, so every layer, the lowest included, can subclass it, and the `epsjax` command can
catch it before jax is imported. Each layer raises its own subclass, defined where that layer lives:

    pallas_kernels   epsjax.pallas_kernels.errors.KernelError   a GEMM backend, tiling or operand that cannot run here
    sharding         epsjax.sharding.errors.PlanError           a mesh, rule set, expert plan or transport
    models           epsjax.models.config.ConfigError           a model configuration or config.json field
    epsjax           epsjax.checkpoint.CheckpointError          checkpoint files and tensors (file and tensor named)
                     epsjax.generation.RequestError             prompts, lengths, sampling parameters, decode steps
                     epsjax.compilation.BucketError             a ShapeBuckets ladder
                     epsjax.scheduler.errors.ScheduleError      hardware, calibrations, plans, workloads, schedules
                                                                (epsjax/scheduler, and FinDEP's epsjax/dep)
                     epsjax.offload.errors.OffloadError         offload settings, expert stores and caches, routing
                                                                predictors and traces
                     epsjax.deployment.SpecError                a deployment spec (strategy, mesh, plan, quantization,
                                                                offload) that cannot be built as asked, named by its
                                                                `epsjax generate` flag
                     epsjax.serve.ServeError                    a server setting (context length, queue, steps,
                                                                API key); what HTTP clients send is answered
                                                                with OpenAI error bodies (epsjax.serve.protocol)
                     epsjax.cli.UsageError                      a combination of the command's flags

The `epsjax` command prints any of them as one line and exits with status 2; anything else is a bug and keeps its
traceback. The README's "Errors" table lists what each means and what to do.
"""


class EpsjaxError(ValueError):
    """Input epsjax cannot use; the message names what, the value seen and what is allowed."""
