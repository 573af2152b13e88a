"""OffloadError: an offload setting or input that cannot work (the message names which, the value and the limit)."""

from epsjax.errors import EpsjaxError


class OffloadError(EpsjaxError):
    """Offloaded inference asked for something it cannot do: an offload mode, budget or eviction policy, an expert
    store's host memory kind or weights, a cache's slots, a routing predictor that does not fit its model or traces,
    a trace replay's settings."""
