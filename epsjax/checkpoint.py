"""Hugging Face safetensors checkpoints <-> MoETransformer parameters.

Loading reads a directory as it is on disk (config.json plus model.safetensors, or shards listed by
model.safetensors.index.json), streams one tensor rule at a time from the memory-mapped files (so host RAM never
holds a second copy of the model), converts to our layout and dtype, and places each parameter on its device(s)
before the next is read. Every tensor is checked: missing, unexpected and mis-shaped tensors are errors that name
the tensor and both shapes. Pickled checkpoints (*.bin, *.pt) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from models import MoETransformer, ModelConfig
from models.families import family_module

# Tensors some checkpoints carry that hold no parameters (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as it is: the message says what and where."""


def read_config(path: str | os.PathLike, *, dtype: str | None = None) -> ModelConfig:
    """Our ModelConfig from a checkpoint directory's config.json (dtype: override config.json's torch_dtype)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    hf = json.loads(config_file.read_text())
    if "model_type" not in hf:
        raise CheckpointError(f"{config_file}: no model_type")
    dtype = dtype or hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    cfg = family_module(hf["model_type"]).config_from_hf(hf, dtype=dtype)
    return cfg.replace(name=Path(path).resolve().name)


def tensor_files(path: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{index} lists shard files that do not exist: {', '.join(absent)}")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{path} holds only pickled weights ({', '.join(pickled)}); epsjax loads safetensors only, because "
                "unpickling a file can execute arbitrary code. Convert it once in a trusted environment, e.g. "
                "transformers' `AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, "
                "safe_serialization=True)`.")
        raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def load_checkpoint(path: str | os.PathLike, *, dtype: str | None = None,
                    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
                    progress: bool = True) -> MoETransformer:
    """Builds the model described by `path`'s config.json and fills it from its safetensors files.

    dtype: parameter dtype (default: config.json's torch_dtype). shardings: parameter path -> where to place it
    (default: the default device); sharding/ passes one so that each parameter lands directly in its shards.
    """
    cfg = read_config(path, dtype=dtype)
    files = tensor_files(path)
    model = nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(model)
    abstract = dict(nnx.to_flat_state(abstract_state))
    rules = family_module(_model_type(path)).tensor_rules(cfg)
    _check_rules_cover(cfg, rules, abstract)

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

    values = {}
    handles = {}
    try:
        total = sum(int(np.prod(s)) for rule in rules for s in rule.hf_shapes)
        bar = tqdm(total=total, unit="param", unit_scale=True, desc=f"loading {cfg.name}", disable=not progress)
        for rule in rules:
            arrays = []
            for name, shape in zip(rule.hf_names, rule.hf_shapes):
                file = files[name]
                if file not in handles:
                    handles[file] = safe_open(file, framework="numpy")
                tensor_slice = handles[file].get_slice(name)
                actual = tuple(tensor_slice.get_shape())
                if actual != shape:
                    raise CheckpointError(f"{path}: tensor {name} has shape {actual}, expected {shape} "
                                          f"from config.json")
                arrays.append(handles[file].get_tensor(name))
            for p, array in zip(rule.paths, rule.load(arrays)):
                target = abstract[p]
                value = jnp.asarray(array, dtype=target.dtype) if shardings is None else jax.device_put(
                    np.asarray(array).astype(target.dtype), shardings(p))
                values[p] = value
            bar.update(sum(int(np.prod(s)) for s in rule.hf_shapes))
            del arrays
        bar.close()
    finally:
        handles.clear()

    state = nnx.from_flat_state([(p, abstract[p].replace(values[p])) for p in abstract])
    return nnx.merge(graphdef, state)


def save_checkpoint(model: MoETransformer, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Writes the model as a Hugging Face directory (config.json + safetensors in the family's HF layout).

    With max_shard_bytes, tensors are split over several files listed in model.safetensors.index.json.
    """
    cfg = model.cfg
    family = family_module(cfg.family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
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


def _model_type(path) -> str:
    return json.loads((Path(path) / "config.json").read_text())["model_type"]


def _check_rules_cover(cfg: ModelConfig, rules, abstract: dict) -> None:
    """Every parameter of the model is filled by exactly one rule (a failure here is a bug in a family mapping)."""
    covered = collections.Counter(p for rule in rules for p in rule.paths)
    duplicated = {p for p, n in covered.items() if n > 1}
    uncovered = set(abstract) - set(covered)
    unknown = set(covered) - set(abstract)
    if duplicated or uncovered or unknown:
        raise AssertionError(f"{cfg.family} tensor rules do not match the model: uncovered={sorted(uncovered)}, "
                             f"unknown={sorted(unknown)}, duplicated={sorted(duplicated)}")
