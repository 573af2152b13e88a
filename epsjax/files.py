"""Reading the small JSON files a user hands epsjax (config.json, shard indexes, calibrations, GEMM profile tables,
predictor configs): one reader, whose failures are one line naming the file, raised as the caller's error type."""

from __future__ import annotations

import json
from pathlib import Path

from epsjax.errors import EpsjaxError


def read_json(path, what: str, error: type[EpsjaxError], hint: str = ""):
    """The parsed JSON of `path`, or `error` naming the file, `what` it holds and why it cannot be read (then
    `hint`, what to do)."""
    path, tail = Path(path), f"; {hint}" if hint else ""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}{tail}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({e}){tail}") from None
