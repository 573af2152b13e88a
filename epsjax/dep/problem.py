"""FinDEP's problem for a model on a deployment: linear task models fitted to the scheduler's cost models over the
sizes the solver explores, and the memory limits.

    cfg = fit_layers(get_preset("deepseek-v2"), deployment)     # as many layers as the weights leave room for
    problem = problem_for(cfg, deployment, seq_len=1024)
    solve(problem).plan
"""

from __future__ import annotations

from epsjax.dep.perf import Deployment, LinearModels, TaskCosts
from epsjax.dep.schedule import layer_kinds
from epsjax.dep.simulate import DEPProblem
from epsjax.scheduler import layer_costs as lc
from epsjax.scheduler.errors import ScheduleError
from epsjax.models.config import ModelConfig


def fit_layers(cfg: ModelConfig, deployment: Deployment, *, weight_fraction: float = 0.75) -> ModelConfig:
    """cfg with the most layers (at most its own) whose weights take at most weight_fraction of the usable memory
    of every attention and expert device, leaving the rest to KV cache and activations. The paper's testbeds
    cannot hold DeepSeek-V2 whole (236B parameters, ~470 GB in bf16, vs 8 x 48 GB), so their runs use fewer
    layers too; the per-layer schedule is what matters."""
    for layers in range(cfg.num_layers, 0, -1):
        trial = cfg.replace(num_layers=layers, dense_layers=tuple(l for l in cfg.dense_layers if l < layers))
        memory = TaskCosts(trial, deployment, seq_len=1).memory()
        if (memory.ag_fixed <= weight_fraction * memory.ag_limit
                and memory.eg_fixed <= weight_fraction * memory.eg_limit):
            return trial
    raise ScheduleError(f"not even one layer of {cfg.name} fits on {deployment.describe()}")


def problem_for(cfg: ModelConfig, deployment: Deployment, seq_len: int, context: int = 0, *,
                max_micro_batches: int = 8, max_segments: int = 8, max_micro_batch_size: int = 4096,
                task_costs: TaskCosts | None = None) -> DEPProblem:
    """The DEPProblem of prompts of seq_len tokens (after `context` cached ones) on the deployment."""
    costs = task_costs or TaskCosts(cfg, deployment, seq_len, context)
    memory = costs.memory()
    largest = max(memory.max_tokens(1, 1), seq_len)
    models = LinearModels.fit(costs, seq_len / max_segments, min(largest, max_micro_batch_size * seq_len))
    return DEPProblem(layer_kinds(cfg), lc.side_ffn_width(cfg) > 0, seq_len, deployment.ag, models, memory,
                      max_micro_batches=max_micro_batches, max_segments=max_segments,
                      max_micro_batch_size=max_micro_batch_size)
