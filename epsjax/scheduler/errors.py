"""ScheduleError: hardware, a calibration, a plan, a workload or a schedule the cost models cannot use (the message
names which, the value and what is allowed). epsjax/scheduler (EPS-MoE) and epsjax/dep (FinDEP) raise it."""

from epsjax.errors import EpsjaxError


class ScheduleError(EpsjaxError):
    """An unknown hardware preset or dtype, a calibration file missing fields, a plan or layout that cannot run
    (pipeline degree, split, rule set), a workload that does not fit its model (tokens, loads, heads and experts
    over devices), a schedule whose tasks are malformed, or a FinDEP deployment, schedule or solver space that
    cannot be built."""
