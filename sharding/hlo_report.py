"""What the compiled EP MoE looks like to XLA's scheduler: its collectives, in schedule order, and their inputs.

Reads the text of an optimized, scheduled HLO module (`jax.jit(f).lower(...).compile().as_text()`), entry
computation only. It answers the questions the expert pipeline raises:

- independence: does a stage's dispatch collective read any other stage's collective (and so, transitively, its
  expert GEMMs)? does a stage's return read a later stage's? (Nothing in the program should force either.)
- overlap: did the backend make the collectives asynchronous (`*-start` / `*-done` pairs), and which expert
  computations, GEMM kernels among them, did the schedule place between a start and its done?
- host traffic: does the program move data to or from the host (send/recv, infeed/outfeed, host callbacks,
  host memory spaces)?

Scopes come from the jax.named_scope names of sharding/ep_moe.py: ep_dispatch_{s}, ep_experts_{s}, ep_return_{s}.
XLA:GPU drops the metadata of the collectives it rewrites (ragged all-to-all among them); such a collective gets
its scope from its data: one whose payload was computed by the GEMM kernels of ep_experts_{s} (the nearest ones
upstream) is that stage's return, one whose result is read first by the GEMM kernels of ep_experts_{s} (the nearest
ones downstream) is that stage's dispatch.
"""

from __future__ import annotations

import dataclasses
import re

from epsjax.sharding.errors import PlanError

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "all-reduce", "collective-permute",
               "reduce-scatter")
HOST_OPS = ("send", "recv", "send-done", "recv-done", "infeed", "outfeed")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>.*?) (?P<op>[\w\-]+)\((?P<args>.*)$")
_SCOPE = re.compile(r'op_name="[^"]*?\b(?P<scope>ep_(?:dispatch|experts|return)_\d+|ep_count_exchange)\b')
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) [^\n]*\{\n(?P<body>.*?)^\}", re.S | re.M)
# What a GEMM kernel looks like in a computation's body: a Pallas kernel (Mosaic GPU, Triton), a cuBLAS or
# Triton GEMM fusion, or a plain dot (XLA:CPU).
_GEMM = re.compile(r'custom_call_target="(?:mosaic_gpu[\w]*|__gpu\$xla\.gpu\.triton|__cublas\$\w*gemm\w*|'
                   r'triton_kernel_call)"|"kind":"__triton_gemm"|\bdot\(|\bragged-dot\(')
_HOST_CALL = re.compile(r'custom_call_target="[^"]*(?:callback|host)[^"]*"', re.I)
_PASS_THROUGH = ("get-tuple-element", "bitcast", "copy", "tuple", "copy-start", "copy-done")


@dataclasses.dataclass(frozen=True)
class Instruction:
    index: int           # position in the schedule
    name: str
    op: str
    operands: tuple[str, ...]
    scope: str           # "ep_dispatch_0", ... or "" outside the EP MoE's scopes
    line: str
    gemm: bool = False   # a GEMM kernel (or a fusion around one)

    @property
    def stage(self) -> int | None:
        m = re.search(r"_(\d+)$", self.scope)
        return int(m.group(1)) if m else None

    @property
    def is_collective(self) -> bool:
        base = self.op.removesuffix("-start").removesuffix("-done")
        return base in COLLECTIVES or (self.op in ("async-start", "async-done") and any(
            c in self.line for c in COLLECTIVES))


def computations(hlo_text: str) -> dict[str, str]:
    """Every computation's body text by name."""
    return {m.group("name"): m.group("body") for m in _COMPUTATION.finditer(hlo_text)}


def entry_instructions(hlo_text: str) -> list[Instruction]:
    """The entry computation's instructions in schedule order (the module must be scheduled), with the scopes
    of collectives that lost their metadata inferred from their data."""
    match = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M)
    if match is None:
        raise PlanError("no ENTRY computation in the HLO text")
    bodies = computations(hlo_text)

    def is_gemm(line: str, op: str) -> bool:
        if op in ("dot", "ragged-dot") or (op == "custom-call" and _GEMM.search(line)):
            return True
        called = re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", line)
        return any(_GEMM.search(bodies.get(c, "")) for c in called)

    out = []
    for line in match.group(1).splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        args = m.group("args").split("), ")[0]  # operands come before the attributes
        operands = tuple(re.findall(r"%([\w.\-]+)", args))
        scope = _SCOPE.search(line)
        out.append(Instruction(len(out), m.group("name"), m.group("op"), operands,
                               scope.group("scope") if scope else "", line, is_gemm(line, m.group("op"))))
    return _infer_collective_scopes(out)


def _infer_collective_scopes(instructions: list[Instruction]) -> list[Instruction]:
    by_name = {i.name: i for i in instructions}
    users: dict[str, list[Instruction]] = {}
    for i in instructions:
        for o in i.operands:
            users.setdefault(o, []).append(i)

    def nearest_gemm_scope(name: str, step) -> str:
        """The ep_experts scope of the nearest GEMM kernel (breadth first) along `step` (operands or users):
        GEMM kernels keep their metadata where XLA:GPU's collectives lose theirs."""
        frontier, seen = [name], {name}
        while frontier:
            nxt = []
            for n in frontier:
                for m in step(n):
                    if m in seen or m not in by_name:
                        continue
                    seen.add(m)
                    inst = by_name[m]
                    if inst.gemm and inst.scope.startswith("ep_experts"):
                        return inst.scope
                    nxt.append(m)
            frontier = nxt
        return ""

    def operands_of(n):
        return by_name[n].operands

    def users_of(n):
        return [u.name for u in sorted(users.get(n, ()), key=lambda u: u.index)]

    out = []
    for inst in instructions:
        if inst.is_collective and not inst.scope and not inst.op.endswith("-done") and inst.operands:
            # A payload computed by a stage's GEMMs is that stage's return; otherwise the collective is the
            # dispatch of the stage whose GEMMs first read what it delivers.
            computed_in = nearest_gemm_scope(inst.name, operands_of)
            if computed_in:
                inst = dataclasses.replace(inst, scope=computed_in.replace("experts", "return"))
            else:
                read_in = nearest_gemm_scope(inst.name, users_of)
                if read_in:
                    inst = dataclasses.replace(inst, scope=read_in.replace("experts", "dispatch"))
        out.append(inst)
    # A -done takes its start's scope.
    scopes = {i.name: i.scope for i in out}
    return [dataclasses.replace(i, scope=scopes.get(i.operands[0], "")) if i.op.endswith("-done") and i.operands
            and not i.scope and i.is_collective else i for i in out]


def _ancestors(by_name: dict[str, Instruction], name: str) -> set[str]:
    seen, stack = set(), [name]
    while stack:
        for operand in by_name[stack.pop()].operands:
            if operand in by_name and operand not in seen:
                seen.add(operand)
                stack.append(operand)
    return seen


@dataclasses.dataclass(frozen=True)
class AsyncPair:
    start: str                   # "name:scope"
    done: str
    scope: str                   # the collective's scope ("ep_dispatch_1", ...; "" outside the EP MoE)
    between: tuple[str, ...]     # scopes of the expert computations scheduled between start and done
    gemms_between: tuple[str, ...]  # scopes of the GEMM kernels among them

    def overlaps_other_stage_gemm(self) -> bool:
        """Whether a GEMM of a stage other than the collective's own runs while it is in flight."""
        own = re.search(r"_(\d+)$", self.scope)
        return any(own is None or not g.endswith(f"_{own.group(1)}") for g in self.gemms_between)


@dataclasses.dataclass
class Report:
    collectives: list[str]                 # "op:scope" in schedule order
    async_pairs: list[AsyncPair]
    dispatch_violations: list[str]         # dispatch collectives that read another stage's collective
    return_violations: list[str]           # return collectives that read a later stage's collective
    host_transfers: list[str]              # instructions that move data to or from the host

    def pair(self, scope: str) -> AsyncPair | None:
        return next((p for p in self.async_pairs if p.scope == scope), None)

    def summary(self) -> str:
        lines = ["collectives in schedule order: " + ", ".join(self.collectives)]
        if self.async_pairs:
            for p in self.async_pairs:
                lines.append(f"async {p.start} .. {p.done}: {len(p.between)} expert ops in between "
                             f"({', '.join(sorted(set(p.between))) or 'none'}; GEMM kernels of "
                             f"{', '.join(sorted(set(p.gemms_between))) or 'none'})")
        else:
            lines.append("no asynchronous collective pairs (*-start/*-done): the collectives are synchronous")
        lines.append("stage dispatches independent of other stages' collectives and GEMMs: "
                     + ("yes" if not self.dispatch_violations else f"NO ({self.dispatch_violations})"))
        lines.append("stage returns independent of later stages: "
                     + ("yes" if not self.return_violations else f"NO ({self.return_violations})"))
        lines.append("host transfers: " + (", ".join(self.host_transfers) or "none"))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"collectives": self.collectives,
                "async_pairs": [dataclasses.asdict(p) for p in self.async_pairs],
                "dispatch_violations": self.dispatch_violations, "return_violations": self.return_violations,
                "host_transfers": self.host_transfers}


def report(hlo_text: str) -> Report:
    instructions = entry_instructions(hlo_text)
    by_name = {i.name: i for i in instructions}
    collectives = [i for i in instructions if i.is_collective and not i.op.endswith("-done")]
    ep_collectives = [i for i in collectives if i.scope.startswith(("ep_dispatch", "ep_return"))]
    dispatch_bad, return_bad = [], []
    for c in ep_collectives:
        upstream = [by_name[a] for a in _ancestors(by_name, c.name)]
        other = [a for a in upstream if a.is_collective and a.scope.startswith(("ep_dispatch", "ep_return"))
                 and not a.op.endswith("-done")]
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
        inside = [i for i in instructions[start.index + 1:done.index] if i.scope.startswith("ep_experts")]
        between = tuple(i.scope for i in inside if i.op in ("fusion", "dot", "while", "custom-call", "call",
                                                            "convolution"))
        pairs.append(AsyncPair(f"{start.name}:{start.scope}", done.name, start.scope, between,
                               tuple(i.scope for i in inside if i.gemm)))
    host = [f"{i.name} ({i.op})" for i in instructions
            if i.op in HOST_OPS or _HOST_CALL.search(i.line) or re.search(r"\{[^}]*:S\(5\)\}", i.line)]
    return Report([f"{c.op}:{c.scope or '-'}" for c in collectives], pairs, dispatch_bad, return_bad, host)
