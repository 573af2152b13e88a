"""config.json's sizes against the checkpoint's tensors, from the safetensors headers alone.

A config.json is input like any other: a size it declares that the files do not hold (a layer count of 4000 beside
tensors for 4 layers, a hidden_size of 10**7 beside a [160, 64] embedding) must be refused before any work or memory
in proportion to it is spent. `check_sizes` runs on the tensor names and header shapes (checkpoint.tensor_files)
before the family's tensor rules are listed or the abstract model is built, in this order:

    layers   the layer indices in the tensor names must be exactly 0 .. num_layers - 1 (a layer beyond the declared
             count is an error, as every unexpected tensor is: the checkpoint and its config.json disagree)
    experts  a declared expert count above the per-expert tensors the files hold (".experts.{e}." names)
    kinds    which layers are dense and which hold routed experts (families with dense layers)
    sizes    each field of the family's size_fields (models/families): the dimension of the tensors that shows it

Each is a ConfigError naming config.json, the field, the declared value and what the files hold. A size is blamed
on the config only when every tensor that shows it agrees on another value; a single damaged tensor is left to the
per-tensor checks of epsjax.checkpoint (CheckpointError naming the tensor and both shapes). After the layers and
experts agree, the work left (listing the tensor rules, the abstract model) is proportional to the files.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

from epsjax.models import ModelConfig
from epsjax.models.config import ConfigError
from epsjax.models.families import family_module

_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def ranges(values) -> str:
    """[0, 1, 2, 3, 7] -> "0-3, 7"."""
    values, parts = sorted(values), []
    for v in values:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_sizes(cfg: ModelConfig, files: dict, config_file: Path) -> None:
    """Raises a ConfigError when config.json (parsed as cfg) declares a size the tensors in `files` (name ->
    checkpoint.TensorInfo, from the headers: .shape is read) do not hold: module docstring."""
    family = family_module(cfg.family)
    layout = family.LAYOUT
    by_layer = _tensors_by_layer(files, layout.layer_prefix)
    _check_layers(cfg, by_layer, layout, config_file)
    _check_expert_count(cfg, files, layout, config_file)
    if layout.dense_field is not None:
        _check_layer_kinds(cfg, by_layer, layout, config_file)
    for field in family.size_fields(cfg):
        _check_field(field, files, config_file)


def _tensors_by_layer(files, prefix: str) -> dict[int, list[str]]:
    by_layer = collections.defaultdict(list)
    for name in files:
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit() and rest:
                by_layer[int(index)].append(name[len(prefix) + len(index) + 1:])
    return by_layer


def _check_layers(cfg, by_layer, layout, config_file) -> None:
    held, declared = set(by_layer), cfg.num_layers
    if len(held) == declared and max(held) == declared - 1:  # exactly 0 .. declared - 1 (no range of declared made)
        return
    holds = (f"tensors for layers {ranges(held)} ({_count(len(held), 'layer')})" if held else
             f"no tensors named {layout.layer_prefix}N.* (no layers)")
    gap = sorted(set(range(max(held, default=-1) + 1)) - held)
    if gap:
        holds += f"; none for layers {ranges(gap)}"
    raise ConfigError(f"{config_file} declares {layout.layers_field}={declared}, but the checkpoint holds {holds}")


def _check_expert_count(cfg, files, layout, config_file) -> None:
    """Only the direction that would cost work: more experts declared than the files hold (an expert beyond the
    declared count is a stray tensor unless the routers agree; the router witnesses in size_fields say so)."""
    held = {int(m.group(1)) for name in files if (m := _EXPERT.search(name))}
    if held and cfg.num_experts > len(held):
        raise ConfigError(f"{config_file} declares {layout.experts_field}={cfg.num_experts}, but the checkpoint "
                          f"holds tensors for experts {ranges(held)} ({_count(len(held), 'expert')})")


def _check_layer_kinds(cfg, by_layer, layout, config_file) -> None:
    """Dense and MoE layers as config.json's dense_field declares them against the files: a layer whose tensors
    hold routed experts (".experts." or the router) is an MoE layer there; one with tensors and none of them is
    dense."""
    declared = {l for l in range(cfg.num_layers) if cfg.is_moe_layer(l)}
    held = {l for l, names in by_layer.items()
            if any(n == layout.router or ".experts." in n for n in names)}
    if held != declared:
        raise ConfigError(f"{config_file} declares routed experts in layers {ranges(declared)} and dense layers "
                          f"{ranges(set(range(cfg.num_layers)) - declared)} (its {layout.dense_field}), but the "
                          f"checkpoint holds routed experts in layers {ranges(held)}")


def _check_field(field, files, config_file) -> None:
    seen = [(name, dim, files[name].shape) for name, dim in field.where
            if name in files and len(files[name].shape) > dim]
    extents = {shape[dim] for _, dim, shape in seen}
    if len(extents) != 1:
        return  # absent, or tensors that disagree among themselves: the per-tensor checks name them
    extent = extents.pop()
    if extent == field.expected:
        return
    held = field.held(extent)
    holds = f"{field.field}={held}" if held is not None else f"{extent} there"
    name, _, shape = seen[0]
    more = "" if len(seen) == 1 else "; 1 more tensor agrees" if len(seen) == 2 else f"; {len(seen) - 1} more agree"
    raise ConfigError(f"{config_file} declares {field.field}={field.value}{field.how}, but the checkpoint holds "
                      f"{holds} ({name} has shape {tuple(shape)}{more})")
