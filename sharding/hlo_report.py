"""What the compiled EP MoE looks like to XLA's scheduler: its collectives, in schedule order, and their inputs.

Reads the text of an optimized, scheduled HLO module (`jax.jit(f).lower(...).compile().as_text()`), entry
computation only. It answers the two questions the expert pipeline raises:

- independence: does a stage's dispatch collective read any other stage's collective (and so, transitively, its
  expert GEMMs)? does a stage's return read a later stage's? (Nothing in the program should force either.)
- overlap: did the backend make the collectives asynchronous (`*-start` / `*-done` pairs), and which expert
  computations did the schedule place between a start and its done?

Scopes come from the jax.named_scope names of sharding/ep_moe.py: ep_dispatch_{s}, ep_experts_{s}, ep_return_{s}.
"""

from __future__ import annotations

import dataclasses
import re

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "collective-permute",
               "reduce-scatter")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>.*?) (?P<op>[\w\-]+)\((?P<args>.*)$")
_SCOPE = re.compile(r'op_name="[^"]*?\b(?P<scope>ep_(?:dispatch|experts|return)_\d+|ep_count_exchange)\b')


@dataclasses.dataclass(frozen=True)
class Instruction:
    index: int           # position in the schedule
    name: str
    op: str
    operands: tuple[str, ...]
    scope: str           # "ep_dispatch_0", ... or "" outside the EP MoE's scopes
    line: str

    @property
    def stage(self) -> int | None:
        m = re.search(r"_(\d+)$", self.scope)
        return int(m.group(1)) if m else None

    @property
    def is_collective(self) -> bool:
        base = self.op.removesuffix("-start").removesuffix("-done")
        return base in COLLECTIVES or (self.op in ("async-start", "async-done") and any(
            c in self.line for c in COLLECTIVES))


def entry_instructions(hlo_text: str) -> list[Instruction]:
    """The entry computation's instructions in schedule order (the module must be scheduled)."""
    match = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M)
    if match is None:
        raise ValueError("no ENTRY computation in the HLO text")
    out = []
    for line in match.group(1).splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        args = m.group("args").split("), ")[0]  # operands come before the attributes
        operands = tuple(re.findall(r"%([\w.\-]+)", args))
        scope = _SCOPE.search(line)
        out.append(Instruction(len(out), m.group("name"), m.group("op"), operands,
                               scope.group("scope") if scope else "", line))
    return out


def _ancestors(by_name: dict[str, Instruction], name: str) -> set[str]:
    seen, stack = set(), [name]
    while stack:
        for operand in by_name[stack.pop()].operands:
            if operand in by_name and operand not in seen:
                seen.add(operand)
                stack.append(operand)
    return seen


@dataclasses.dataclass
class Report:
    collectives: list[str]                 # "op:scope" in schedule order
    async_pairs: list[tuple[str, str, list[str]]]  # (start, done, scopes of expert work scheduled in between)
    dispatch_violations: list[str]         # dispatch collectives that read another stage's collective
    return_violations: list[str]           # return collectives that read a later stage's collective

    def summary(self) -> str:
        lines = ["collectives in schedule order: " + ", ".join(self.collectives)]
        if self.async_pairs:
            for start, done, between in self.async_pairs:
                lines.append(f"async {start} .. {done}: {len(between)} expert ops in between "
                             f"({', '.join(sorted(set(between))) or 'none'})")
        else:
            lines.append("no asynchronous collective pairs (*-start/*-done): the collectives are synchronous")
        lines.append("stage dispatches independent of other stages' collectives and GEMMs: "
                     + ("yes" if not self.dispatch_violations else f"NO ({self.dispatch_violations})"))
        lines.append("stage returns independent of later stages: "
                     + ("yes" if not self.return_violations else f"NO ({self.return_violations})"))
        return "\n".join(lines)


def report(hlo_text: str) -> Report:
    instructions = entry_instructions(hlo_text)
    by_name = {i.name: i for i in instructions}
    collectives = [i for i in instructions if i.is_collective and not i.op.endswith("-done")]
    ep_collectives = [i for i in collectives if i.scope.startswith(("ep_dispatch", "ep_return"))]
    dispatch_bad, return_bad = [], []
    for c in ep_collectives:
        upstream = [by_name[a] for a in _ancestors(by_name, c.name)]
        other = [a for a in upstream if a.is_collective and a.scope.startswith(("ep_dispatch", "ep_return"))]
        if c.scope.startswith("ep_dispatch"):
            dispatch_bad += [f"{c.name} reads {a.name} ({a.scope})" for a in other]
        else:
            return_bad += [f"{c.name} reads {a.name} ({a.scope})" for a in other if a.stage > c.stage]
    pairs = []
    starts = {i.name: i for i in instructions if i.op.endswith("-start") and i.is_collective}
    for done in (i for i in instructions if i.op.endswith("-done") and i.is_collective):
        start = next((starts[o] for o in done.operands if o in starts), None)
        if start is None:
            continue
        between = [i.scope for i in instructions[start.index + 1:done.index] if i.scope.startswith("ep_experts")
                   and i.op in ("fusion", "dot", "while", "custom-call", "call", "convolution")]
        pairs.append((f"{start.name}:{start.scope}", f"{done.name}", between))
    return Report([f"{c.op}:{c.scope or '-'}" for c in collectives], pairs, dispatch_bad, return_bad)
