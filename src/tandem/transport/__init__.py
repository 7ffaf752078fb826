"""The transport seam: the only package that imports ``torch.distributed``."""

from tandem.transport.accounting import ByteMeter, StepBytes
from tandem.transport.faults import ComputeFaults
from tandem.transport.group import Group, Transport
from tandem.transport.liveness import Pending
from tandem.transport.shaping import LinkEmulator

__all__ = [
    "ByteMeter",
    "ComputeFaults",
    "Group",
    "LinkEmulator",
    "Pending",
    "StepBytes",
    "Transport",
]
