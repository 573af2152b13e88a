"""The memory check before loading: what a deployment needs per device and on the host, against what there is.

One check for every way to run (the build calls `check` once the strategy, and for a mesh the placement, are known,
before any weight is made or read):

    parameters  in the chosen dtype on the fullest device: one device holds them all (FP8 routed experts with
                --quantize fp8 from a checkpoint; a preset's are made whole first); a mesh, each parameter's shard
                (ParamPlacement.elements_per_device); DEP, the attention-side parameters on an attention device or
                the expert slots on an expert device; offload, all but the routed experts plus the budget's share
    KV cache    the request's (kv_cache_shapes per layer x the bucketed batch and cache length), split over the
                batch shards of a mesh or the attention devices of DEP
    host        offload: every routed expert (and, for a preset, the whole model made there first)

against `available`: a GPU's free memory (memory_stats: bytes_limit - bytes_in_use), of which DEVICE_SHARE may be
taken (activations, logits and XLA's workspace need the rest), and the host's physical memory (or its cgroup's
limit), of which HOST_SHARE; CPU devices have no memory of their own, so all of them and the host share the host's.
Over it: a SpecError with the numbers (GiB; MiB below one) and the flags that would fit, each computed as this check computes it
(--dtype bfloat16, --quantize fp8, --offload lru --offload-budget F, a shorter --max-new-tokens, more devices with
--strategy dp_ep). `epsjax generate --force` (DeploymentSpec.force) skips it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from epsjax.deployment.spec import DeploymentSpec, RequestShape, SpecError
from epsjax.models import ModelConfig
from epsjax.models.attention import kv_cache_shapes

GiB = 2**30
DEVICE_SHARE = 0.9
HOST_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class Need:
    """Bytes a deployment needs. params, kv_cache: on its fullest device; total: over all its devices (what CPU
    devices take from the host together); host: host memory outside the devices; cache: (rows, length) of the KV
    cache on the fullest device."""

    params: int
    kv_cache: int
    total: int
    host: int = 0
    cache: tuple[int, int] = (0, 0)

    @property
    def device(self) -> int:
        return self.params + self.kv_cache


@dataclasses.dataclass(frozen=True)
class Available:
    """device: free bytes of the fullest-loaded device (None: CPU devices, which share the host's memory); host: the
    host's physical memory (or its cgroup's limit); count and kind: the devices."""

    device: int | None
    host: int
    count: int
    kind: str

    def fits(self, need: Need) -> bool:
        if self.device is None:
            return need.total + need.host <= HOST_SHARE * self.host
        return need.device <= DEVICE_SHARE * self.device and need.host <= HOST_SHARE * self.host


def host_memory_bytes() -> int:
    """The host's physical memory, or the cgroup's memory limit when lower (the OOM killer acts on that one)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(physical, int(text))
    return physical


def device_free_bytes(device) -> int | None:
    """A device's free memory (bytes_limit - bytes_in_use of its memory_stats), or None for a CPU device or one
    that reports none."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def available(devices) -> Available:
    frees = [device_free_bytes(d) for d in devices]
    device = None if any(f is None for f in frees) else min(frees)
    return Available(device, host_memory_bytes(), len(devices), devices[0].device_kind)


# What a deployment needs -------------------------------------------------------------------------------------------


def cache_rows_and_length(spec: DeploymentSpec, cfg: ModelConfig, request: RequestShape,
                          batch_multiple: int = 1) -> tuple[int, int]:
    """(batch rows, cache length) of the request's KV cache, bucketed as the engine buckets it
    (Engine.request_shapes)."""
    buckets = spec.buckets
    if buckets is None:
        prompt = min(math.ceil(request.prompt_len / 8) * 8, cfg.max_seq_len)
        return request.batch, min(cfg.max_seq_len, math.ceil((prompt + request.max_new_tokens) / 64) * 64)
    prompt = buckets.length(request.prompt_len)
    return buckets.batch_size(request.batch, batch_multiple), buckets.length(prompt + request.max_new_tokens)


def kv_cache_bytes(cfg: ModelConfig, rows: int, length: int) -> int:
    per_layer = sum(math.prod(shape) for shape in kv_cache_shapes(cfg, rows, length).values())
    return cfg.num_layers * per_layer * cfg.jnp_dtype.itemsize


def _param_bytes(cfg: ModelConfig, fp8_experts: bool = False) -> tuple[int, int]:
    """(routed-expert bytes, every other parameter's bytes); FP8 routed experts take a byte each plus a float32
    scale per expert and output channel."""
    counts, item = cfg.param_counts(), cfg.jnp_dtype.itemsize
    routed = counts["routed_experts"]
    rest = (counts["total"] - routed) * item
    if not fp8_experts:
        return routed * item, rest
    scales = _moe_layers(cfg) * cfg.num_experts * (2 * cfg.expert_ffn_dim + cfg.d_model) * 4
    return routed + scales, rest


@dataclasses.dataclass(frozen=True)
class Case:
    """What a need is computed for: the spec and request under the resolved strategy; placement: a mesh
    strategy's ParamPlacement; dep_split, dep_slots: DEP's (attention, expert) group sizes and expert slots per
    expert device. `need` computes it; the options recompute it with one thing changed."""

    spec: DeploymentSpec
    cfg: ModelConfig
    request: RequestShape
    strategy: str
    placement: object = None
    dep_split: tuple[int, int] | None = None
    dep_slots: int | None = None

    def but(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)

    def need(self) -> Need:
        """The bytes the case needs (module docstring)."""
        spec, cfg, request = self.spec, self.cfg, self.request
        item = cfg.jnp_dtype.itemsize
        if self.strategy == "dep":
            ag, _ = self.dep_split
            routed, rest = _param_bytes(cfg)
            rows, length = cache_rows_and_length(spec, cfg, request)
            rows = math.ceil(rows / ag)
            kv = kv_cache_bytes(cfg, rows, length)
            experts = self.dep_slots * _moe_layers(cfg) * 3 * cfg.d_model * cfg.expert_ffn_dim * item
            fullest = (rest, kv) if rest + kv >= experts else (experts, 0)
            return Need(*fullest, total=ag * (rest + kv) + self.dep_split[1] * experts, cache=(rows, length))
        if self.placement is not None:  # a mesh: each parameter's shard, the batch split over the batch shards
            mesh, rules = self.placement.mesh, self.placement.rules
            shards = math.prod(mesh.shape[a] for a in rules.batch_axes)
            rows, length = cache_rows_and_length(spec, cfg, request, shards)
            rows = math.ceil(rows / shards)
            params, kv = self.placement.elements_per_device() * item, kv_cache_bytes(cfg, rows, length)
            return Need(params, kv, total=mesh.size * (params + kv), cache=(rows, length))
        rows, length = cache_rows_and_length(spec, cfg, request)
        kv = kv_cache_bytes(cfg, rows, length)
        if spec.offload is not None:
            routed, rest = _param_bytes(cfg)
            budget = int(spec.offload_budget * routed)
            host = routed if spec.model is not None else routed + rest  # a preset is made whole on the host first
            return Need(rest + budget, kv, total=rest + budget + kv, host=host, cache=(rows, length))
        # one device; FP8 experts stream in quantized from a checkpoint, a preset's are made in its dtype first
        routed, rest = _param_bytes(cfg, fp8_experts=spec.quantize is not None and spec.model is not None)
        return Need(routed + rest, kv, total=routed + rest + kv, cache=(rows, length))


def _moe_layers(cfg: ModelConfig) -> int:
    return cfg.num_layers - len(set(cfg.dense_layers))


# The check ---------------------------------------------------------------------------------------------------------


def check(case: Case, devices, *, have: Available | None = None) -> Need:
    """The case's Need, if it fits what `devices` and the host have (or spec.force); else a SpecError with the
    numbers and the options that would fit."""
    have = have or available(list(devices))
    needed = case.need()
    if case.spec.force or have.fits(needed):
        return needed
    spec, cfg = case.spec, case.cfg
    options = _options(case, needed, have)
    what = f"preset {spec.preset}" if spec.model is None else cfg.name
    dtype = cfg.dtype + (", routed experts FP8" if spec.quantize is not None and spec.model is not None else "")
    rows, length = needed.cache
    host = f" and {_size(needed.host)} of host memory" if needed.host else ""
    if have.device is None:
        where = (f"the host has {_size(have.host)} ({HOST_SHARE:.0%} usable), shared by its {have.count} CPU "
                 f"device(s), which would take {_size(needed.total + needed.host)} together")
    else:
        where = (f"each {have.kind} has {_size(have.device)} free ({DEVICE_SHARE:.0%} usable) and the host "
                 f"{_size(have.host)} ({HOST_SHARE:.0%} usable)")
    if options:
        fit = "would fit: " + "; ".join(options)
    else:
        fit = ("none of --dtype bfloat16, --quantize fp8, --offload, a shorter cache or more devices would fit"
               + (" (a tiny-* preset would)" if spec.model is None else ""))
    raise SpecError(f"{what} with --strategy {case.strategy} needs {_size(needed.device)} per device (parameters "
                    f"{_size(needed.params)} in {dtype} + KV cache {_size(needed.kv_cache)} for {rows} x "
                    f"{length} tokens){host}, and {where}; {fit}; or --force to load anyway")


def _size(n: int) -> str:
    """Bytes in GiB (MiB below one GiB, so a small model's numbers still read)."""
    return f"{n / GiB:.1f} GiB" if n >= 10 * GiB else f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def _options(case: Case, needed: Need, have: Available) -> list[str]:
    """The flags that would make it fit, each checked as `check` checks it (the first that fits of each kind)."""
    from epsjax.offload.runtime import OffloadConfig

    spec, cfg = case.spec, case.cfg
    options = []
    if cfg.dtype == "float32":
        half = case.but(spec=dataclasses.replace(spec, dtype="bfloat16"), cfg=cfg.replace(dtype="bfloat16"))
        if have.fits(half.need()):
            options.append("--dtype bfloat16")
    local = case.strategy == "local"
    if local and spec.offload is None and spec.quantize is None and spec.model is not None:
        if have.fits(case.but(spec=dataclasses.replace(spec, quantize="fp8")).need()):
            options.append("--quantize fp8")
    if local and have.device is not None and spec.quantize is None:  # off CPU the host's memory is apart
        routed, rest = _param_bytes(cfg)
        room = DEVICE_SHARE * have.device - rest - needed.kv_cache
        budget = min(1.0, math.floor(room / routed * 100) / 100) if routed else 0.0
        if budget >= (OffloadConfig.max_inflight + 1) / (_moe_layers(cfg) * cfg.num_experts):  # build's least
            mode = spec.offload or "lru"
            offloaded = case.but(spec=dataclasses.replace(spec, offload=mode, offload_budget=budget))
            if have.fits(offloaded.need()):
                options.append(f"--offload-budget {budget:g}" if spec.offload else
                               f"--offload lru --offload-budget {budget:g}")
    shorter = _shorter_cache(case, have)
    if shorter:
        options.append(shorter)
    if have.device is not None and case.strategy != "dep":  # more devices add memory only off CPU
        more = _more_devices(case, needed, have)
        if more:
            options.append(more)
    return options


def _shorter_cache(case: Case, have: Available) -> str | None:
    """--max-new-tokens N: the most new tokens (a power of two below the request's) whose cache fits."""
    best = None
    for new in (2**k for k in range(31)):
        if new >= case.request.max_new_tokens:
            break
        shorter = case.but(request=dataclasses.replace(case.request, max_new_tokens=new))
        if not have.fits(shorter.need()):
            break
        best = shorter
    if best is None:
        return None
    rows, length = best.need().cache
    return f"--max-new-tokens {best.request.max_new_tokens} (a KV cache of {rows} x {length} tokens)"


def _more_devices(case: Case, needed: Need, have: Available) -> str | None:
    """--strategy dp_ep on the fewest devices of this kind (as many as now or more) whose share fits: the routed
    experts split over them (ceil(E / n) slots each), every other parameter on each, the batch split over them."""
    spec, cfg, request = case.spec, case.cfg, case.request
    routed, rest = _param_bytes(cfg)
    for n in sorted({have.count} | {2**k for k in range(1, 10)}):
        already = n == have.count and case.strategy in ("dp_ep", "tp_ep")
        if n < max(have.count, 2) or n > cfg.num_experts or already:
            continue
        rows, length = cache_rows_and_length(spec, cfg, request, n)
        per = (rest + routed * math.ceil(cfg.num_experts / n) // cfg.num_experts
               + kv_cache_bytes(cfg, math.ceil(rows / n), length))
        if per <= DEVICE_SHARE * have.device and needed.host <= HOST_SHARE * have.host:
            return "--strategy dp_ep" if n == have.count else f"--strategy dp_ep on {n} devices of this kind"
    return None
