"""Keras layers of dlcli's own that saved models hold, registered so that a .keras file
that holds them loads (`register`, called by `checkpoints.load_model` and by the models
that use them).

Example:
    x = layers.BatchNormalization(center=False, scale=False)(x)
    x = dlcli_layers.register()["ScaledBias"](8.0)(x)  # a bias that SGD moves 64x as fast
"""

from __future__ import annotations

import functools

from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")


@functools.cache
def register() -> dict:
    """{name: class} of dlcli's layers, defined (and registered with Keras) on first call,
    so that importing dlcli does not import Keras."""

    @keras.saving.register_keras_serializable(package="dlcli")
    class ScaledBias(keras.layers.Layer):
        """x + factor * b with b learnt from 0, per channel: SGD moves the bias factor**2 as
        fast as a plain one at the same rate, while weight decay takes the same share of it
        (airbench's faster rate for batch norm's shift, without an optimizer of its own)."""

        def __init__(self, factor: float, **kwargs):
            super().__init__(**kwargs)
            self.factor = float(factor)

        def build(self, input_shape):
            self.b = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="b")

        def call(self, x):
            return x + keras.ops.cast(self.factor * self.b, x.dtype)

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    return {"ScaledBias": ScaledBias}
