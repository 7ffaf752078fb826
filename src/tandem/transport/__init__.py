"""The transport seam: the only package that imports ``torch.distributed``."""

from tandem.transport.accounting import ByteMeter, StepBytes
from tandem.transport.liveness import Pending
from tandem.transport.shaping import LinkEmulator
from tandem.transport.transport import Group, Transport

__all__ = [
    "ByteMeter",
    "Group",
    "LinkEmulator",
    "Pending",
    "StepBytes",
    "Transport",
]
