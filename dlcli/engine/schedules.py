"""Learning-rate schedules set once an epoch, as functions of the epoch alone.

A function of the epoch (not of a step counter kept in the optimizer) gives a resumed run
the same rate as an uninterrupted one, and a run resumed with more `--epochs` the rate of a
fresh run of that length.

Example:
    model.fit(..., callbacks=[cosine_per_epoch(1e-3, first=0, length=20)])
"""

from __future__ import annotations

import math

from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")


def cosine(peak: float, epoch: int, first: int, length: int) -> float:
    """`peak` at epoch `first` (0-based), falling along a half cosine towards 0 at the end of
    epoch `first + length - 1`."""
    return peak * 0.5 * (1 + math.cos(math.pi * (epoch - first) / max(length, 1)))


def cosine_per_epoch(peak: float, first: int, length: int):
    """A Keras callback that sets `cosine(peak, epoch, first, length)` at each epoch's start."""
    return keras.callbacks.LearningRateScheduler(lambda epoch: cosine(peak, epoch, first, length))
