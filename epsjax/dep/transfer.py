"""A2E and E2A: exactly the routed rows, sent straight from the device that holds them to the one that needs them.

On attention device a, the micro-batch's T_l * K (token, k) rows are sorted by (expert device e, segment j,
expert slot) and counted: counts[a, e, j, s] (steps.sort_rows). The host reads the counts (a [ag, eg, r2,
slots] int32 table, the only device->host traffic) and then:

    A2E(l, m)     for each (a, e, j) with n = sum_s counts[a, e, j, s] > 0:
                      rows a -> e = x_sorted_a[start : start + n]      n * D * itemsize bytes over the link
                  (one piece per segment, so the expert side never re-slices what it received; segmented,
                  A2E(l, m, j) sends segment j's pieces only)
                  plus counts[:, e, j, :] host -> expert device e per segment (ag * slots int32)
    E2A(l, m, j)  for each (e, a) with n = sum_s counts[a, e, j, s] > 0:
                      rows e -> a = y_j on e, source a's rows          n * D * itemsize bytes over the link

Nothing is padded on the wire: a piece of n rows goes as the power-of-two chunks of n's binary expansion (13 rows:
8 + 4 + 1), one jax.device_put each, so slicing and placing compile once per chunk size (about log2 of the
largest piece) instead of once per distinct n, which in decoding would be a new program for almost every step.
The receiving side copies pieces into a buffer (expert side: rows of segment j from every source, padded to a
bucket so the expert FFN compiles once per bucket; attention side: the micro-batch's sorted rows in their
original order); those are local copies, not transfers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Transfer:
    kind: str        # "a2e" | "e2a" | "counts" (host -> expert device)
    layer: int
    micro: int
    segment: int     # -1 for an a2e of the whole micro-batch
    source: int      # attention device index a (a2e) / expert device index e (e2a) / -1 (host)
    dest: int
    rows: int
    nbytes: int


@dataclasses.dataclass
class TransferLog:
    records: list[Transfer] = dataclasses.field(default_factory=list)

    def add(self, *args) -> None:
        self.records.append(Transfer(*args))

    def total(self, kind: str | None = None) -> tuple[int, int]:
        """(rows, bytes) moved, over every transfer or those of one kind."""
        sel = [r for r in self.records if kind is None or r.kind == kind]
        return sum(r.rows for r in sel), sum(r.nbytes for r in sel)

    def summary(self) -> dict:
        return {kind: dict(zip(("rows", "bytes"), self.total(kind))) for kind in ("a2e", "e2a", "counts")}


@functools.partial(jax.jit, static_argnames=("rows",))
def take_rows(x_MD, start, *, rows: int):
    """x[start : start + rows] on x's device; one compilation per distinct `rows`."""
    return jax.lax.dynamic_slice_in_dim(x_MD, start, rows, axis=0)


@jax.jit
def put_rows(buffer_RD, piece_ND, start):
    """buffer with piece written at row `start` (a local copy on the buffer's device)."""
    return jax.lax.dynamic_update_slice_in_dim(buffer_RD, piece_ND, start, axis=0)


def bucket(rows: int, minimum: int = 8) -> int:
    """A static buffer size for `rows` rows: the next power of two (at least `minimum`)."""
    return max(minimum, 1 << max(0, int(rows) - 1).bit_length())


def chunks(n: int) -> list[tuple[int, int]]:
    """(offset, size) of n rows cut into the powers of two of n's binary expansion, largest first:
    13 -> [(0, 8), (8, 4), (12, 1)]."""
    out, at = [], 0
    for bit in reversed(range(int(n).bit_length())):
        if n >> bit & 1:
            out.append((at, 1 << bit))
            at += 1 << bit
    return out


def send(x_MD, start: int, n: int, device: jax.Device) -> list[tuple[int, jax.Array]]:
    """x[start : start + n] (on x's device) onto `device`, one transfer per chunk: (offset in the n rows, piece)."""
    return [(at, jax.device_put(take_rows(x_MD, start + at, rows=size), device)) for at, size in chunks(n)]


def shard_on(array: jax.Array, device: jax.Device) -> jax.Array:
    """The shard of a sharded array that lives on `device`."""
    for shard in array.addressable_shards:
        if shard.device == device:
            return shard.data
    raise RuntimeError(f"{device} holds no shard of this array")  # the runtime's own arrays: a bug


def a2e(log: TransferLog, layer: int, micro: int, segment: int, x_sorted, counts: np.ndarray, attention_devices,
        expert_devices) -> dict[int, list[list[jax.Array | None]]]:
    """Sends every attention device's rows for each expert device, one piece per segment: of every segment
    (segment = -1, the micro-batch's single A2E) or of one (segmented A2E). Returns pieces[j][a][e], the n rows
    as `send`'s chunks on expert device e (an empty list when n = 0). counts: [ag, eg, r2, slots] on the host."""
    rows_aej = counts.sum(axis=-1)                                  # [ag, eg, r2]
    r2 = counts.shape[2]
    segments = range(r2) if segment < 0 else (segment,)
    pieces = {j: [] for j in segments}
    for a, device_a in enumerate(attention_devices):
        x_a = shard_on(x_sorted, device_a)                          # [T_l * K, D] sorted by (e, j, slot)
        starts = np.concatenate([[0], np.cumsum(rows_aej[a].reshape(-1))]).reshape(-1)
        for j in segments:
            pieces[j].append([[] for _ in expert_devices])
        for e, device_e in enumerate(expert_devices):
            sent = 0
            for j in segments:
                n = int(rows_aej[a, e, j])
                pieces[j][a][e] = send(x_a, int(starts[e * r2 + j]), n, device_e)       # a -> e: n rows
                sent += n
            if sent:
                log.add("a2e", layer, micro, segment, a, e, sent, sent * x_a.shape[1] * x_a.dtype.itemsize)
    return pieces


def gather_segment(pieces_ae, counts: np.ndarray, segment: int, expert_devices, dim: int, dtype):
    """On each expert device e, segment j's rows from every source in (source, slot) order, padded with zero rows
    to a common bucket R: a list of [R, D] arrays, one per expert device (local copies only). pieces_ae: segment
    j's A2E pieces, [a][e]."""
    per_source = counts[:, :, segment].sum(axis=-1)                # [ag, eg] rows of segment j
    R = bucket(int(per_source.sum(axis=0).max()))
    buffers = []
    for e, device_e in enumerate(expert_devices):
        buffer = jnp.zeros((R, dim), dtype, device=device_e)
        at = 0
        for a in range(counts.shape[0]):
            for offset, piece in pieces_ae[a][e]:
                buffer = put_rows(buffer, piece, at + offset)
            at += int(per_source[a, e])
        buffers.append(buffer)
    return buffers


def e2a(log: TransferLog, layer: int, micro: int, segment: int, y_rows, counts: np.ndarray, attention_devices,
        expert_devices) -> list[tuple[int, int, jax.Array]]:
    """Sends segment j's computed rows back to their attention devices. Returns (a, row, piece): each chunk of the
    rows on attention device a and the row of a's sorted buffer it belongs at (see `assemble`)."""
    per_source = counts[:, :, segment].sum(axis=-1)                # [ag, eg]
    rows_ae = counts.sum(axis=(2, 3))
    before_seg = counts[:, :, :segment].sum(axis=(2, 3))
    out = []
    for e, device_e in enumerate(expert_devices):
        y_e = shard_on(y_rows, device_e)                           # [R, D] in (source, slot) order
        at = 0
        for a, device_a in enumerate(attention_devices):
            n = int(per_source[a, e])
            if n == 0:
                continue
            row = int(rows_ae[a, :e].sum() + before_seg[a, e])
            out += [(a, row + offset, piece) for offset, piece in send(y_e, at, n, device_a)]   # e -> a: n rows
            log.add("e2a", layer, micro, segment, e, a, n, n * y_e.shape[1] * y_e.dtype.itemsize)
            at += n
    return out


def assemble(pieces: list[tuple[int, int, jax.Array]], attention_devices, rows: int, dim: int, dtype) -> list:
    """Each attention device's [rows, D] sorted buffer from its returned pieces (zero rows where nothing was
    routed: padding tokens). Local copies, issued when the attention device needs them (combine): issued earlier,
    they would sit in the device's in-order queue waiting for the expert group and hold up its next attention."""
    buffers = [jnp.zeros((rows, dim), dtype, device=d) for d in attention_devices]
    for a, row, piece in pieces:
        buffers[a] = put_rows(buffers[a], piece, row)
    return buffers
