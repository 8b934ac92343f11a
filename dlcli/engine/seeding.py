"""Seeds: the same seed gives the same run, and each epoch's randomness depends only on
(seed, epoch), which is what lets a resumed run repeat an uninterrupted one exactly."""

from __future__ import annotations

from dlcli.engine.keras_workarounds import fused_cross_entropy_on_cpu, seed_generators
from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


def set_seed(seed: int | None) -> None:
    """Seed Python, NumPy and TensorFlow, and ask TensorFlow for deterministic kernels
    (keeping the fused cross-entropy kernel where it is deterministic already: CPUs)."""
    if seed is None:
        return
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    fused_cross_entropy_on_cpu()


def epoch_seed(seed: int | None, epoch: int) -> int | None:
    return None if seed is None else seed * 100_003 + epoch


def reseed_model(model, seed: int | None, epoch: int) -> None:
    """Give every random layer (dropout, augmentation) a state derived from (seed, epoch)."""
    if seed is None:
        return
    import numpy as np

    for i, gen in enumerate(seed_generators(model)):
        gen.state.assign(np.array([epoch_seed(seed, epoch) + 7919 * i, 0], dtype=gen.state.dtype))


def seed_states(model) -> list[list[int]]:
    return [[int(v) for v in gen.state.numpy()] for gen in seed_generators(model)]


def restore_seed_states(model, states: list[list[int]]) -> None:
    import numpy as np

    for gen, state in zip(seed_generators(model), states):
        gen.state.assign(np.array(state, dtype=gen.state.dtype))
