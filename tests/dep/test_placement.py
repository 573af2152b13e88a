"""DEP placement: each device receives its share of the parameters and nothing more.

DEPRuntime.from_checkpoint reads a (sharded) safetensors checkpoint of tiny DeepSeek-V2 (a dense layer, MLA, shared
experts, 16 routed experts) onto the 3 + 5 split, where 16 experts over 5 expert devices are 3, 3, 3, 3, 4 in 4 slots
each. Every transfer during loading is recorded (jax.device_put), and the bytes each device received must be exactly
its share: an expert device 4 slots of every MoE layer's 3 expert weights, an attention device the attention-side
parameters, no device anything else. The placed arrays' shardings and values are checked too, and the live arrays'
bytes per device; where the platform reports memory statistics (not XLA:CPU), the bytes in use as well.
"""

import gc

import jax
import numpy as np
import pytest
from flax import nnx

from epsjax.checkpoint import CheckpointError, save_checkpoint
from epsjax.dep import DEPGroups
from epsjax.dep.placement import is_routed_expert
from epsjax.dep.runtime import DEPRuntime
from tests.dep.conftest import tiny_model
from epsjax.models.quantize import EXPERT_WEIGHTS

NAME = "tiny-deepseek-v2"


@pytest.fixture(scope="module")
def model():
    return tiny_model(NAME)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("dep_ckpt")
    save_checkpoint(model, path, max_shard_bytes=200_000)  # several shards and an index
    return path


def _shares(model, groups):
    """Bytes each device should hold: {device: bytes}."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    expert = sum(v.get_value().nbytes for p, v in flat.items() if is_routed_expert(p))
    rest = sum(v.get_value().nbytes for p, v in flat.items() if not is_routed_expert(p))
    cfg = model.cfg
    per_slot = expert // (len(cfg.moe_layers) * cfg.num_experts)  # one expert's 3 weights of one layer
    share = {d: rest for d in groups.attention_devices}
    share.update({d: len(cfg.moe_layers) * groups.placement.slots * per_slot for d in groups.expert_devices})
    return share


def _received(calls):
    """Bytes each device received over the recorded device_put calls."""
    got = {}
    for shape, itemsize, sharding in calls:
        for device, index in sharding.devices_indices_map(shape).items():
            rows = [len(range(*i.indices(n))) for i, n in zip(index, shape)]
            got[device] = got.get(device, 0) + int(np.prod(rows)) * itemsize
    return got


def _live_bytes(exclude: set) -> dict:
    gc.collect()
    out = {}
    for a in jax.live_arrays():
        if id(a) in exclude or a.is_deleted():
            continue
        for shard in a.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def test_checkpoint_goes_straight_to_each_group(model, checkpoint, monkeypatch):
    groups = DEPGroups.split(3, 5, model.cfg.num_experts)
    share = _shares(model, groups)
    before_ids = {id(a) for a in jax.live_arrays()}
    in_use = {d: (d.memory_stats() or {}).get("bytes_in_use") for d in share}
    calls, device_put = [], jax.device_put

    def recording_put(x, device=None, *args, **kwargs):
        """Records what each leaf put sends where (a jax.Array already placed so is left where it is)."""
        sharding = jax.sharding.SingleDeviceSharding(device) if isinstance(device, jax.Device) else device
        assert isinstance(sharding, jax.sharding.Sharding), f"a put without a destination: {device!r}"
        for leaf in jax.tree.leaves(x):
            if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
                continue
            calls.append((tuple(np.shape(leaf)), np.dtype(leaf.dtype).itemsize, sharding))
        return device_put(x, device, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", recording_put)
    runtime = DEPRuntime.from_checkpoint(checkpoint, groups)
    monkeypatch.undo()

    assert _received(calls) == share  # every device exactly its share, during loading and placing
    live = _live_bytes(before_ids)
    for device, want in share.items():  # what stays (the loaded arrays; small scalars aside)
        assert want <= live.get(device, 0) <= want + 4096, device
        if in_use[device] is not None:  # platforms that report memory (GPU, TPU)
            assert device.memory_stats()["bytes_in_use"] - in_use[device] <= want + (1 << 20), device

    # the expert weights: split over the expert mesh in slot order (empty slots zero), the model's values
    table = groups.placement.expert_of_slot()
    slots = groups.placement.slots
    for layer, (_, _, weights) in zip(model.layers, runtime._layers):
        if layer.moe is None:
            continue
        for name, w in zip(EXPERT_WEIGHTS, weights):
            assert w.sharding.device_set == set(groups.expert_devices)
            assert {s.device: s.data.shape[0] for s in w.addressable_shards} == dict.fromkeys(groups.expert_devices,
                                                                                              slots)
            want = np.asarray(getattr(layer.moe, name)[...])[np.maximum(table, 0)] * (table >= 0)[:, None, None]
            np.testing.assert_array_equal(np.asarray(w), want, err_msg=name)
    # everything else: whole on every attention device, nowhere else (zero-size placeholders stand in for the
    # expert weights in the attention-side layer states)
    attention_side = [runtime._top[2]] + [state for _, state, _ in runtime._layers]
    for leaf in jax.tree.leaves(attention_side):
        if leaf.size == 0:
            continue
        assert leaf.sharding.device_set == set(groups.attention_devices)
        assert leaf.sharding.is_fully_replicated


def test_in_memory_model_sends_each_expert_device_its_slots_only(model, monkeypatch):
    """DEPRuntime(model, groups) with the model on one device: each expert device receives its own experts' rows
    (3 or 4 of 16, at most `slots`), never the whole stacked weight."""
    groups = DEPGroups.split(3, 5, model.cfg.num_experts)
    calls, device_put = [], jax.device_put

    def recording_put(x, device=None, *args, **kwargs):
        if isinstance(device, jax.Device) and device in groups.expert_devices:
            calls.append((device, tuple(x.shape)))
        return device_put(x, device, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", recording_put)
    DEPRuntime(model, groups)
    monkeypatch.undo()
    owned = dict(zip(groups.expert_devices, groups.placement.experts_per_device()))
    weights = [(name, getattr(layer.moe, name)[...].shape) for layer in model.layers if layer.moe is not None
               for name in EXPERT_WEIGHTS]
    assert len(calls) == len(weights) * groups.eg
    for (device, shape), (_, full) in zip(calls, [w for w in weights for _ in range(groups.eg)]):
        assert shape == (owned[device],) + full[1:], device


def test_checkpoint_must_match_the_groups(checkpoint):
    with pytest.raises(CheckpointError, match="16 experts, the DEP groups place 8"):
        DEPRuntime.from_checkpoint(checkpoint, DEPGroups.split(4, 4, 8))
