"""Learning-rate schedulers."""

from fedpipe.common.schedulers.base import Scheduler

__all__ = ["Scheduler"]
