"""Hugging Face safetensors checkpoints <-> MoETransformer parameters.

Loading reads a directory as it is on disk (config.json plus model.safetensors, or shards listed by
model.safetensors.index.json), streams one tensor rule at a time from the memory-mapped files (so host RAM never
holds a second copy of the model), converts to our layout and dtype, and places each parameter on its device(s)
before the next is read. What is checked, each failure a CheckpointError naming the file and tensor:

- every file's safetensors header before anything is read: its length, JSON, dtypes, shapes and data offsets
  (inside the file, matching shape x dtype, not overlapping), so a truncated or corrupt file is named at once;
- missing, unexpected and mis-shaped tensors (both shapes named);
- dtypes: weights must be floating point (F16, BF16, F32, F64); an integer, boolean or 8-bit float tensor is an
  error, as is a config.json that declares a quantization_config (no quantized format is supported yet);
- finiteness: every tensor is checked for NaN and Inf as it is placed (an error naming the tensor and the count,
  or with allow_nonfinite=True a warning);
- the config.json fields (models.ConfigError, with the file named), and every size they declare against the
  tensors' names and header shapes (epsjax.checkpoint_sizes) before the tensor rules are listed or the model is
  built, so a bogus layer count or width costs no work in proportion to it (`check_checkpoint`).

Pickled checkpoints (*.bin, *.pt) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from epsjax.checkpoint_sizes import check_sizes
from epsjax.errors import EpsjaxError
from epsjax.files import read_json
from epsjax.models import MoETransformer, ModelConfig
from epsjax.models.config import ConfigError
from epsjax.models.families import family_module
from epsjax.models.quantize import EXPERT_WEIGHTS, check_scheme, quantize_weight

# Tensors some checkpoints carry that hold no parameters (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(EpsjaxError):
    """A checkpoint directory that cannot be loaded as it is: the message says what and where."""


# safetensors dtype -> bytes per element; only the floating-point ones hold weights we load.
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                      "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_TENSOR_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (offsets relative to the data after the header)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_json(file: Path, what: str):
    return read_json(file, what, CheckpointError)


def file_present(file: Path, what: str) -> bool:
    """Whether `file` is there; a broken link or a directory in its place is a CheckpointError naming it."""
    if file.is_symlink() and not file.exists():
        raise CheckpointError(f"{file}: {what} is a broken symbolic link (to {os.readlink(file)})")
    if file.exists() and not file.is_file():
        raise CheckpointError(f"{file}: {what} is not a regular file")
    return file.is_file()


def read_config(path: str | os.PathLike, *, dtype: str | None = None) -> ModelConfig:
    """Our ModelConfig from a checkpoint directory's config.json (dtype: override config.json's torch_dtype).
    A field the family cannot use is a ConfigError naming config.json, the field, its value and what is allowed."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a Hugging Face model directory holds config.json and "
                              "safetensors files)")
    config_file = path / "config.json"
    if not file_present(config_file, "config.json"):
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    hf = _read_json(config_file, "config.json")
    if not isinstance(hf, dict):
        raise ConfigError(f"{config_file}: must hold a JSON object, got {type(hf).__name__}")
    if hf.get("quantization_config") is not None:
        method = (hf["quantization_config"] or {}).get("quant_method", "?") if isinstance(
            hf["quantization_config"], dict) else "?"
        raise CheckpointError(f"{config_file}: quantization_config (quant_method {method!r}) declares a quantized "
                              "checkpoint; epsjax loads floating-point weights only")
    try:
        if not isinstance(hf.get("model_type"), str):
            raise ConfigError(f"field model_type is missing or not a string (got {hf.get('model_type')!r})")
        dtype = dtype or hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"  # ModelConfig checks it
        cfg = family_module(hf["model_type"]).config_from_hf(hf, dtype=dtype)
        return cfg.replace(name=path.resolve().name)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from None


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking its header against the file: a CheckpointError
    names the file (and tensor) when the header is truncated, not JSON, or declares data the file does not hold."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: truncated ({size} bytes): not even the 8-byte length of a "
                                      "safetensors header")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: truncated or not a safetensors file: the header claims {length} "
                                      f"bytes and the file holds {size - 8} after the length")
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON ({e}); is this a safetensors "
                              "file?") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = lambda why: CheckpointError(f"{file}: tensor {name}: {why}")  # noqa: E731
        if not isinstance(entry, dict):
            raise bad("its header entry is not a JSON object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise bad(f"shape {shape!r} is not a list of integers >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)):
            raise bad(f"data_offsets {offsets!r} are not two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"data_offsets {offsets} are not 0 <= begin <= end")
        if end > data_bytes:
            raise bad(f"data_offsets {offsets} reach past the end of the file ({data_bytes} data bytes): the file is "
                      "truncated")
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - begin != expected:
            raise bad(f"data_offsets {offsets} hold {end - begin} bytes, but shape {shape} of {dtype} needs "
                      f"{expected}")
        infos[name] = TensorInfo(file, dtype, tuple(shape), begin, end)
    ordered = sorted(infos.items(), key=lambda kv: kv[1].begin)
    for (a, ia), (b, ib) in zip(ordered, ordered[1:]):
        if ib.begin < ia.end:
            raise CheckpointError(f"{file}: tensors {a} and {b} overlap (data_offsets {[ia.begin, ia.end]} and "
                                  f"{[ib.begin, ib.end]})")
    return infos


def tensor_files(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor name -> where it is and what its header says, for every tensor of the checkpoint (headers checked)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if file_present(index, "the shard index"):
        table = _read_json(index, "the shard index")
        weight_map = table.get("weight_map") if isinstance(table, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no weight_map object (tensor name -> shard file name)")
        shards = {file: path / file for file in set(weight_map.values())}
        absent = sorted(str(f) for f in shards.values() if not file_present(f, "a shard"))
        if absent:
            raise CheckpointError(f"{index} lists shard files that do not exist: {', '.join(absent)}")
        headers = {file: read_header(f) for file, f in shards.items()}
        infos = {}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise CheckpointError(f"{index} places tensor {name} in {file}, whose header does not declare it")
            infos[name] = headers[file][name]
        return infos
    single = path / "model.safetensors"
    if not file_present(single, "model.safetensors"):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{path} holds only pickled weights ({', '.join(pickled)}); epsjax loads safetensors only, because "
                "unpickling a file can execute arbitrary code. Convert it once in a trusted environment, e.g. "
                "transformers' `AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, "
                "safe_serialization=True)`.")
        raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    return read_header(single)


def check_checkpoint(path: str | os.PathLike, cfg: ModelConfig | None = None, *,
                     dtype: str | None = None) -> tuple[ModelConfig, dict[str, TensorInfo], list]:
    """Checks a checkpoint directory as far as its config.json and safetensors headers can, reading no weight and
    building no model: (cfg, tensor name -> TensorInfo, the family's tensor rules). cfg: read_config(path, dtype=)'s
    result when the caller has it.

    In order: config.json's fields (read_config); every header (tensor_files); each size config.json declares
    against the tensors (checkpoint_sizes.check_sizes: a ConfigError naming the field, its value and what the files
    hold); then every tensor the family's layout needs is there, none is unexpected, each has its shape and a
    floating-point dtype (CheckpointError naming the file and tensor)."""
    path = Path(path)
    if cfg is None:
        cfg = read_config(path, dtype=dtype)
    elif dtype is not None and dtype != cfg.dtype:
        raise CheckpointError(f"{path}: dtype={dtype!r} contradicts the given config's {cfg.dtype!r}; give one")
    files = tensor_files(path)
    check_sizes(cfg, files, path / "config.json")
    rules = family_module(cfg.family).tensor_rules(cfg)  # bounded by the files now that the counts agree

    missing = [name for rule in rules for name in rule.hf_names if name not in files]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: {len(missing)} tensors the {cfg.family} layout needs are missing: {shown}")
    expected = {name for rule in rules for name in rule.hf_names}
    unexpected = sorted(n for n in files if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensors for a {cfg.family} model "
                              f"with this config.json: {shown}")
    for rule in rules:
        for name, shape in zip(rule.hf_names, rule.hf_shapes):
            info = files[name]
            if info.shape != shape:
                raise CheckpointError(f"{info.file}: tensor {name} has shape {info.shape}, expected {shape} "
                                      f"from config.json")
            if info.dtype not in FLOAT_TENSOR_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; weights must be "
                                      f"floating point ({', '.join(FLOAT_TENSOR_DTYPES)}), and no quantized "
                                      "format is supported")
    return cfg, files, rules


def load_checkpoint(path: str | os.PathLike, *, dtype: str | None = None,
                    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
                    layout: Callable[[tuple, np.ndarray], np.ndarray] | None = None,
                    progress: bool = True, allow_nonfinite: bool = False,
                    quantize: str | None = None, cfg: ModelConfig | None = None,
                    model_shape=None) -> MoETransformer:
    """Builds the model described by `path`'s config.json and fills it from its safetensors files.

    dtype: parameter dtype (default: config.json's torch_dtype). shardings: parameter path -> where to place it
    (default: the default device); sharding/ passes one so that each parameter lands directly in its shards.
    layout: (parameter path, value as stored) -> value as placed (epsjax.placement.param_layout: routed experts in
    slot order when they do not divide the expert-parallel size).
    allow_nonfinite: load tensors holding NaN or Inf with a warning instead of refusing them.
    quantize: "fp8" stores the routed experts as FP8 W8A8 weights (models.quantize), each stacked expert tensor
    quantized as soon as it is loaded, so the whole model never exists in the checkpoint's dtype at once.
    cfg: read_config(path, dtype=dtype)'s result when the caller has it (config.json is then not read again);
    model_shape: (graphdef, abstract state) of the model (epsjax.placement.abstract_model) when the caller has it.
    """
    check_scheme(quantize)
    if quantize is not None and (shardings is not None or layout is not None):
        raise CheckpointError(f"{path}: quantize={quantize!r} loads onto one device; quantized experts on a mesh "
                              "are not supported yet")
    graphdef, abstract, values = _load(path, dtype=dtype, cfg=cfg, model_shape=model_shape, shardings=shardings,
                                       layout=layout, quantize=quantize, on_host=None, progress=progress,
                                       allow_nonfinite=allow_nonfinite)
    state = nnx.from_flat_state([(p, abstract[p].replace(values[p])) for p in abstract])
    return nnx.merge(graphdef, state)


def load_host_experts(path: str | os.PathLike, *, dtype: str | None = None, device: jax.Device | None = None,
                      progress: bool = True, allow_nonfinite: bool = False, cfg: ModelConfig | None = None,
                      model_shape=None):
    """The model split for offloading (epsjax.offload), read straight from the files: (graphdef, state, experts).

    Every parameter but the routed experts is placed on `device` (default: the default device) as it is read; each
    routed-expert weight stays in host memory as numpy, so no device ever holds the experts. `state` holds a
    [0]-shaped placeholder for each of them (as offload.runtime.split_experts leaves it), and `experts` lists them
    per MoE layer in layer order: (w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]), what
    OffloadEngine.from_split and offload.store.ExpertStore take. Checks as load_checkpoint (finiteness of the
    host tensors on the host). cfg, model_shape: as load_checkpoint."""
    where = None if device is None else jax.sharding.SingleDeviceSharding(device)
    graphdef, abstract, values = _load(path, dtype=dtype, cfg=cfg, model_shape=model_shape,
                                       shardings=None if where is None else (lambda p: where), layout=None,
                                       quantize=None, on_host=lambda p: p[-1] in EXPERT_WEIGHTS, progress=progress,
                                       allow_nonfinite=allow_nonfinite)
    experts = {}
    for p in abstract:
        if p[-1] in EXPERT_WEIGHTS:
            experts.setdefault(p[:-1], {})[p[-1]] = values[p]
            values[p] = jnp.zeros((0,), abstract[p].dtype, device=device)
    state = nnx.from_flat_state([(p, abstract[p].replace(values[p])) for p in abstract])
    per_layer = [tuple(experts[layer][name] for name in EXPERT_WEIGHTS)
                 for layer in sorted(experts, key=lambda path: path[path.index("layers") + 1])]
    return graphdef, state, per_layer


def _load(path, *, dtype, cfg, model_shape, shardings, layout, quantize, on_host, progress, allow_nonfinite):
    """(graphdef, abstract {path: variable}, values {path: placed value}): load_checkpoint's streaming loop.
    on_host(path): keep that parameter as a numpy array in host memory instead of placing it."""
    cfg, files, rules = check_checkpoint(path, cfg, dtype=dtype)  # headers only, before the model is built
    graphdef, abstract_state = model_shape if model_shape is not None else nnx.split(
        nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0))))
    abstract = dict(nnx.to_flat_state(abstract_state))
    _check_rules_cover(cfg, rules, abstract)

    values = {}
    handles = {}
    pending = []  # (rule, count of non-finite values on the device) not yet read back
    total = sum(int(np.prod(s)) for rule in rules for s in rule.hf_shapes)
    bar = tqdm(total=total, unit="param", unit_scale=True, desc=f"loading {cfg.name}", disable=not progress)
    try:
        for rule in rules:
            arrays = []
            for name in rule.hf_names:  # names, shapes and dtypes were checked by check_checkpoint
                info = files[name]
                try:
                    if info.file not in handles:
                        handles[info.file] = safe_open(info.file, framework="numpy")
                    arrays.append(handles[info.file].get_tensor(name))
                except Exception as e:  # noqa: BLE001 - safetensors' errors carry no file name
                    raise CheckpointError(f"{info.file}: tensor {name} cannot be read: {e}") from None
            for p, array in zip(rule.paths, rule.load(arrays)):
                target = abstract[p]
                if on_host is not None and on_host(p):  # an owned host copy in the model's dtype, checked here
                    values[p] = np.array(array, dtype=target.dtype, copy=True)
                    pending.append((rule, np.count_nonzero(~np.isfinite(values[p]))))
                    continue
                if layout is not None:
                    array = np.asarray(layout(p, np.asarray(array).astype(target.dtype)))
                value = jnp.asarray(array, dtype=target.dtype) if shardings is None else jax.device_put(
                    np.asarray(array).astype(target.dtype, copy=False), shardings(p))
                # One fused reduction on the placed value, read back only after the next tensor is placed, so
                # it runs while the host reads that tensor (before quantizing, which would hide a NaN's origin).
                pending.append((rule, _count_nonfinite(value)))
                quantized = quantize is not None and p[-1] in EXPERT_WEIGHTS
                values[p] = quantize_weight(value, quantize) if quantized else value
            bar.update(sum(int(np.prod(s)) for s in rule.hf_shapes))
            del arrays
            while len(pending) > 1:
                _check_finite(*pending.pop(0), files, handles, allow_nonfinite)
        while pending:
            _check_finite(*pending.pop(0), files, handles, allow_nonfinite)
    finally:
        bar.close()  # ends the bar's line, so an error prints on a line of its own
        handles.clear()
    return graphdef, abstract, values


def save_checkpoint(model: MoETransformer, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Writes the model as a Hugging Face directory (config.json + safetensors in the family's HF layout).

    With max_shard_bytes, tensors are split over several files listed in model.safetensors.index.json.
    """
    cfg = model.cfg
    family = family_module(cfg.family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    placed = [p for p, v in flat.items() if p[-1] == "w_gate_EDF" and v.shape[0] != cfg.num_experts]
    if placed:
        raise CheckpointError(f"{'/'.join(map(str, placed[0]))} holds {flat[placed[0]].shape[0]} expert slots, not "
                              f"the model's {cfg.num_experts} experts: a model placed for expert parallelism with "
                              f"uneven or replicated experts is saved from its unplaced copy")
    tensors = {}
    for rule in family.tensor_rules(cfg):
        ours = [np.asarray(jax.device_get(flat[p][...])) for p in rule.paths]
        for name, array in zip(rule.hf_names, rule.save(ours)):
            tensors[name] = np.ascontiguousarray(array)
    (path / "config.json").write_text(json.dumps(family.config_to_hf(cfg), indent=2))
    if max_shard_bytes is None:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


@jax.jit
def _count_nonfinite(value):
    return jnp.sum(~jnp.isfinite(value))


def _check_finite(rule, count, files: dict, handles: dict, allow: bool) -> None:
    """Reads back a placed parameter's non-finite count; a non-zero one is an error naming the checkpoint tensors
    that hold NaN or Inf (or, with allow, a warning). Left alone they would turn every token that touches them into
    NaN, and greedy decoding into token 0."""
    if not int(count):
        return
    culprits = []
    for name in rule.hf_names:
        array = handles[files[name].file].get_tensor(name)
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            culprits.append(f"{files[name].file.name}: {name} ({bad} of {np.size(array)} values)")
    shown = "; ".join(culprits[:3]) + (f"; and {len(culprits) - 3} more tensors" if len(culprits) > 3 else "")
    message = f"non-finite values (NaN or Inf) in {shown}"
    if not allow:
        raise CheckpointError(message + "; load anyway with allow_nonfinite=True (epsjax: --allow-nonfinite)")
    warnings.warn(message + " (loaded: allow_nonfinite)", stacklevel=4)  # the caller of load_checkpoint


def _check_rules_cover(cfg: ModelConfig, rules, abstract: dict) -> None:
    """Every parameter of the model is filled by exactly one rule (a failure here is a bug in a family mapping)."""
    covered = collections.Counter(p for rule in rules for p in rule.paths)
    duplicated = {p for p, n in covered.items() if n > 1}
    uncovered = set(abstract) - set(covered)
    unknown = set(covered) - set(abstract)
    if duplicated or uncovered or unknown:
        raise AssertionError(f"{cfg.family} tensor rules do not match the model: uncovered={sorted(uncovered)}, "
                             f"unknown={sorted(unknown)}, duplicated={sorted(duplicated)}")
