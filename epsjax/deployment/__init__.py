"""One deployment spec, built once: model, dtype, strategy, mesh, expert plan, placement, transport, quantization,
offload -> the engine that serves it.

    spec = DeploymentSpec(preset="tiny-deepseek-v2", strategy="auto")         # checked here: SpecError, one line
    deployment = build(spec, RequestShape(batch=8, prompt_len=32, max_new_tokens=16))
    deployment.engine.generate(prompts, max_new_tokens=16)
    print(deployment.description)                                               # `epsjax generate`'s plan line

`build` runs each set-up step once and records it in `Deployment.steps` (name, seconds):

    config     config.json read and validated (checkpoint.read_config; the family comes from its model_type) and
               every size it declares checked against the safetensors headers (checkpoint.check_checkpoint), or the
               preset's config
    strategy   auto -> dp_ep when the batch splits over several devices, else local (one device; always with
               quantize or offload)
    mesh       the spec's data,tensor,expert sizes, or placement.default_mesh_shape
    placement  placement.place: rules_for_model, the expert slots, nnx.eval_shape, every parameter's sharding
               (the weights below and the expert compute both take these slots)
    memory     the parameters in the chosen dtype and placement and the request's KV cache per device (and the
               offloaded experts on the host) against what the devices and the host have (deployment/memory.py):
               over it, a SpecError with the numbers and the flags that would fit; spec.force (--force) skips it.
               One device and offload: before the weights; a mesh: after the placement; DEP: after the groups
    plan       forced (pipeline_degree), or the scheduler's one search for the request (scheduler.plan_prefill),
               with the whole prefill it predicts; DEP: the FinDEP solver's schedule
    weights    created in their shards, or the checkpoint streamed into them (load_checkpoint(cfg=, model_shape=));
               offload: the non-expert parameters to the device, the routed experts from the files to host memory
               (checkpoint.load_host_experts)
    engine     Engine(model, experts=ParamPlacement.ep_experts(plan), batch_sharding=...) | DEPRuntime.engine |
               OffloadEngine.from_split

What the spec alone decides is checked when it is made (`DeploymentSpec.__post_init__`); what needs the devices,
the model or the request (the batch shards, the DEP group sizes, the offload budget in whole experts, a predictor)
is checked by `build` before anything heavy runs for it. Every failure is a SpecError (an EpsjaxError) whose message
names the `epsjax generate` flag of the field (fields are named after them).

    spec.py    DeploymentSpec, RequestShape, SpecError: what to deploy, checked in one place
    memory.py  the memory check (Case -> Need against Available)
    build.py   build -> Deployment: the steps above, one builder per way to run the experts (one device, offloaded,
               a mesh, disaggregated)
"""

from epsjax.deployment.build import Deployment, GemmBackend, build
from epsjax.deployment.spec import (DEFAULT_PRESET, MESH_STRATEGIES, OFFLOAD_MODES, STRATEGIES, DeploymentSpec,
                                    RequestShape, SpecError)

__all__ = ["DEFAULT_PRESET", "Deployment", "DeploymentSpec", "GemmBackend", "MESH_STRATEGIES", "OFFLOAD_MODES",
           "RequestShape", "STRATEGIES", "SpecError", "build"]
