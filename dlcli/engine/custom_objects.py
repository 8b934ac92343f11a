"""Keras objects of dlcli's own that saved models hold (a layer, an optimizer), registered
with Keras so that a .keras file holding them loads: `register`, which
`checkpoints.load_model` calls, and so do the models that use them.

Example:
    objects = custom_objects.register()
    x = layers.BatchNormalization(center=False, scale=False)(x)
    x = objects["ScaledBias"](8.0)(x)  # a bias that SGD moves 64x as fast
    optimizer = objects["LookaheadSGD"](1.5, momentum=0.85, nesterov=True, start_epochs=3)
    optimizer.plan(total=1_504, steps_per_epoch=47)  # once built: when training begins
"""

from __future__ import annotations

import functools

from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")


@functools.cache
def register() -> dict:
    """{name: class} of dlcli's Keras objects, defined (and registered) on first call, so
    that importing dlcli does not import Keras."""
    ops = keras.ops

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
            return x + ops.cast(self.factor * self.b, x.dtype)

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    @keras.saving.register_keras_serializable(package="dlcli")
    class LookaheadSGD(keras.optimizers.SGD):
        """SGD with airbench's lookahead average of the weights: after `start_epochs` epochs,
        every `every` steps the average moves towards the weights by 1 - rho and the weights
        are set to it, rho = base**every * (step / total)**power, so training moves freely
        early and averages strongly late; at each epoch's end the weights take the average.

        The average is an optimizer variable, so checkpoints keep it and a resumed run goes
        on exactly. `total` and `steps_per_epoch` are set by each training run (`plan`), so a
        run resumed with more epochs averages like a fresh run that long.
        """

        def __init__(self, *args, start_epochs: float = 3, every: int = 5, base: float = 0.95, power: float = 3.0,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.start_epochs, self.every = float(start_epochs), int(every)
            self.base, self.power = float(base), float(power)
            # Set by each run (`plan`), so not part of the optimizer's saved state.
            self.steps = keras.Variable([1.0, 1.0], dtype="float32", trainable=False, name="total_and_epoch_steps")

        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            self.averages = self.add_optimizer_variables(variables, "average")

        def plan(self, total: int, steps_per_epoch: int) -> None:
            """The run's length in steps and the steps of one epoch."""
            self.steps.assign([float(total), float(steps_per_epoch)])

        def update_step(self, gradient, variable, learning_rate):
            super().update_step(gradient, variable, learning_rate)
            average = self.averages[self._get_variable_index(variable)]
            step = ops.cast(self.iterations + 1, "float32")
            total, per_epoch = self.steps[0], self.steps[1]
            start = ops.round(self.start_epochs * per_epoch)
            rho = self.base ** self.every * ops.power(ops.minimum(step / total, 1.0), self.power)
            moves = ops.logical_and(step > start, ops.equal(ops.mod(step, self.every), 0))
            value = ops.cast(variable, "float32")
            mean = ops.where(step <= start, value,
                             ops.where(moves, average + (1 - rho) * (value - average), average))
            self.assign(average, mean)
            takes = ops.logical_and(step >= start,
                                    ops.logical_or(moves, ops.equal(ops.mod(step, per_epoch), 0)))
            self.assign(variable, ops.where(takes, ops.cast(mean, variable.dtype), variable))

        def get_config(self):
            return {**super().get_config(), "start_epochs": self.start_epochs, "every": self.every,
                    "base": self.base, "power": self.power}

    return {"ScaledBias": ScaledBias, "LookaheadSGD": LookaheadSGD}
