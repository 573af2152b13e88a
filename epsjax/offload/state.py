"""OffloadState: the decode state of an offloaded batch. The runtime makes it and the token scheduler regroups it,
so it lives below both (runtime.py imports scheduler.py, never the other way)."""

from __future__ import annotations

import dataclasses

import numpy as np

from epsjax.engine import DecodeState


@dataclasses.dataclass
class OffloadState:
    """A DecodeState plus the recent tokens of every sequence (host side), which the predictor reads."""

    decode: DecodeState
    recent_BW: np.ndarray  # [B, W] int32, right-aligned: the last W tokens fed so far
    recent_valid_BW: np.ndarray  # [B, W] bool
