"""Keras workarounds, each in one place with what it works around.

Each has a test in tests/test_keras_workarounds.py that fails when the workaround is no
longer needed (or no longer works), so it can be removed rather than carried on:

- `build_before_fit`: keras-team/keras#20585, Keras 3's `fit()` under
  MultiWorkerMirroredStrategy; it patches the private `Model._maybe_symbolic_build` of the
  one model and, once per process, Keras's private `trainer.reduce_per_replica` (only its
  MultiWorkerMirroredStrategy mean reduction; every other call goes to the original).
- `seed_generators`: Keras has no public way to list the random-number generators inside
  a model (dropout, augmentation), which per-epoch reseeding needs; this walks the private
  `_flatten_layers`.
"""

from __future__ import annotations

from dlcli.lazy import lazy_import

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


def build_before_fit(model, strategy, dataset) -> None:
    """Work around keras-team/keras#20585, Keras 3's fit() under MultiWorkerMirroredStrategy
    (a no-op under any other strategy).

    Two steps of Keras fail there: building the optimizer by reducing a distributed data
    batch, and averaging scalar metrics across workers with `axis=0`. Build once from a
    local batch, and average scalars over replicas with `axis=None`.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    from keras.src.backend.tensorflow import trainer

    batch = next(iter(dataset))
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if getattr(trainer.reduce_per_replica, "dlcli_patched", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and reduction in ("auto", "mean"):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.dlcli_patched = True
    trainer.reduce_per_replica = reduce_per_replica


def seed_generators(model) -> list:
    """Every `keras.random.SeedGenerator` held by the model's layers (and the model itself)."""
    found = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        found.extend(v for v in vars(layer).values() if isinstance(v, keras.random.SeedGenerator))
    return found
