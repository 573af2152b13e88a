"""FinDEP: disaggregated expert parallelism (attention group / expert group), its schedules and their solver.

    from epsjax import dep
    groups = dep.DEPGroups.split(attention=3, experts=5, num_experts=cfg.num_experts)
    out = dep.DEPRuntime(model, groups).prefill(tokens, mask, schedule=dep.DEPSchedule.findep(2, 2, "AASS"))
    result = dep.DEPRuntime(model, groups).generate(prompts, max_new_tokens=16, schedule=dep.DEPSchedule.pppipe(2))

    deployment = dep.Deployment.split(dep.Testbed("8xH20", "h20", 8), 3, 5)
    problem = dep.problem_for(cfg, deployment, seq_len=1024)      # linear models + memory from the scheduler
    best = dep.solve(problem)                                     # (ma, r1, r2, order), in milliseconds

Files, one job each:
    schedule.py   DEPSchedule (naive / PPPipe / FinDEP) and its task list, shared by runtime and simulator
    groups.py     the two meshes and the expert placement (uneven when eg does not divide E)
    steps.py      the jitted programs of each task kind, on one group's mesh
    transfer.py   A2E / E2A: exactly the routed rows, device to device, in power-of-two chunks
    runtime.py    DEPRuntime: places a model, walks a schedule with asynchronous dispatch
    decode.py     DEPEngine / DEPState: the runtime under the Engine's contract (KV cache, decode steps, generate)
    placement.py  a checkpoint read straight onto the groups (DEPRuntime.from_checkpoint): each device its share
    perf.py       testbeds, deployments, task durations and memory from epsjax.scheduler's cost models, fits
    simulate.py   the step as a scheduler Schedule (simulate / gantt / trace) and its exact fast step time
    problem.py    a model on a deployment -> the solver's problem (fitted linear models, memory, depth that fits)
    solver.py     FinDEP's optimisation and the exhaustive search it is checked against
    workloads.py  plans for a fixed batch, a TTFT budget, decode steps; MegaScale-Infer's ping-pong rule
    overlap.py    CPU diagnostic: did the two groups run at the same time (profiler trace)
"""

from epsjax.dep.groups import DEPGroups, ExpertPlacement, expert_bounds
from epsjax.dep.perf import Deployment, LinearModels, MemoryModel, TaskCosts, Testbed
from epsjax.dep.problem import fit_layers, problem_for
from epsjax.dep.schedule import DEPSchedule, layer_kinds
from epsjax.dep.simulate import DEPProblem, Plan, build_schedule, simulate_plan, step_time
from epsjax.dep.solver import Solution, exhaustive, solve

__all__ = ["DEPGroups", "DEPProblem", "DEPSchedule", "Deployment", "ExpertPlacement", "LinearModels",
           "MemoryModel", "Plan", "Solution", "TaskCosts", "Testbed", "build_schedule", "exhaustive",
           "expert_bounds", "fit_layers", "layer_kinds", "problem_for", "simulate_plan", "solve", "step_time"]


def __getattr__(name):
    # The runtime pulls in models/ and the kernels; load it on first use.
    if name == "DEPRuntime":
        from epsjax.dep.runtime import DEPRuntime
        return DEPRuntime
    raise AttributeError(f"module 'epsjax.dep' has no attribute {name!r}")
