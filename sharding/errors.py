"""PlanError: a mesh, rule set, expert plan or transport that cannot run (the message names which and why)."""

from epsjax.errors import EpsjaxError


class PlanError(EpsjaxError):
    """A parallel layout that cannot run: a mesh larger than the devices, experts or heads that do not divide over
    their mesh axes, an unknown rule set, an expert plan that does not fit the experts, a transport the platform
    lacks, or a compiled program's HLO text the plan report (hlo_report) cannot read."""
