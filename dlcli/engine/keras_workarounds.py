"""Every use of a private Keras or TensorFlow API in dlcli, each in one place with what it
works around.

Each private name is reached through `private(...)`, which raises `KerasInternalsChanged`
naming the workaround and the versions dlcli is tested with (pyproject.toml pins them) where
a Keras or TensorFlow release has moved it: a loud failure, never a silent change of
behaviour. Each workaround also has an `upstream` test in tests/test_keras_workarounds.py
(`pytest -m upstream`, run by CI) that fails once the problem it works around is gone, so it
can be removed rather than carried on:

- `build_before_fit`: keras-team/keras#20585, Keras 3's `fit()` under
  MultiWorkerMirroredStrategy; it patches the private `Model._maybe_symbolic_build` of the
  one model and, once per process, Keras's private `trainer.reduce_per_replica` (only its
  MultiWorkerMirroredStrategy mean reduction; every other call goes to the original).
- `seed_generators`: Keras has no public way to list the random-number generators inside
  a model (dropout, augmentation), which per-epoch reseeding needs; this walks the private
  `_flatten_layers`.
- `without_autotune_thread`: deleting a tf.data iterator waits out its autotuner's sleep
  (TensorFlow 2.21); `training.fit` hands Keras every epoch's data through it.
- `array_data_without_autotune`: the same for the data sets Keras makes of arrays
  (`model.predict(x)`, `evaluate`, `fit(x, y)`); it patches the private
  `ArrayDataAdapter.get_tf_dataset`, once per process, at dlcli's first use of Keras
  (`dlcli.engine.lazy`).
- `fused_cross_entropy_on_cpu`: under `enable_op_determinism` TensorFlow swaps its fused
  sparse softmax cross-entropy for a composite of about ten ops everywhere, though only its GPU
  kernel needs it; on a machine without GPUs this patches the private
  `nn_ops._sparse_softmax_cross_entropy_with_rank_2_logits` back to the fused kernel, once
  per process, from `seeding.set_seed`.
- `cached_attr_skipsets`: Keras 3.15's saving code means to build the attribute skip set of
  each saveable type once, but stores it under another key than it reads, so every save and
  load builds dummy layers and optimizers again; it wraps the private
  `saving_lib.get_attr_skipset` in a cache, once per process, at dlcli's first use of Keras.
- `step_callbacks_class`: Keras's CallbackList converts every step's logs to floats as soon
  as one callback has a per-step hook, which makes the host wait for each step; this list
  overrides its private `_on_train_batch_end` (and `_async_train`) and calls the private
  `pythonify_logs` only for callbacks that want floats.
- `epoch_tensorboard_class`: Keras's TensorBoard callback dispatches a summary per metric at
  every step even when it writes per epoch; this one keeps only the graph writing, through its
  private `_should_write_train_graph` and `_write_keras_model_train_graph`.
- `model_snapshot`: Keras has no public way to save a model as of one moment while it trains
  on (`model.save` reads each variable as it writes it); this takes the model's config and
  the values its saving walk would write, through the private `saving_lib._save_state`,
  `_serialize_model_as_json` and `H5IOStore`, and writes the same .keras file from them later,
  in the checkpoint writer's thread.
- `warm_ema_adam_class` and `ema_averages`: Keras's `use_ema` has no warm-up and no public way
  to read the averaged weights; the gan's generator optimizer overrides `ema_momentum` and
  reads the private `_model_variables_moving_average`.
"""

from __future__ import annotations

import functools
import importlib

from dlcli.errors import RunError

# Nothing of TensorFlow or Keras at import: each function imports them, and runs only where
# dlcli already uses them.

TESTED_WITH = "tensorflow 2.21 and keras 3.15"


class KerasInternalsChanged(RunError):
    """A private Keras or TensorFlow name that a workaround needs is not where it was."""


def private(owner, name: str, workaround: str):
    """`owner.name` (owner a module, a class or a dotted module path), or a loud error naming
    the workaround that needs it: upgrading Keras or TensorFlow past the tested versions must
    not change what dlcli does without a word."""
    where = owner if isinstance(owner, str) else getattr(owner, "__name__", type(owner).__name__)
    try:
        target = importlib.import_module(owner) if isinstance(owner, str) else owner
        return getattr(target, name)
    except (ImportError, AttributeError):
        import keras
        import tensorflow as tf

        raise KerasInternalsChanged(
            f"dlcli's workaround {workaround} needs {where}.{name}, which tensorflow {tf.__version__} / keras "
            f"{keras.__version__} do not have; dlcli is tested with {TESTED_WITH} (see `pytest -m upstream`)"
        ) from None


def build_before_fit(model, strategy, dataset) -> None:
    """Work around keras-team/keras#20585, Keras 3's fit() under MultiWorkerMirroredStrategy
    (a no-op under any other strategy).

    Two steps of Keras fail there: building the optimizer by reducing a distributed data
    batch, and averaging scalar metrics across workers with `axis=0`. Build once from a
    local batch, and average scalars over replicas with `axis=None`.
    """
    import tensorflow as tf
    
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    trainer = importlib.import_module("keras.src.backend.tensorflow.trainer")
    private(trainer, "reduce_per_replica", "build_before_fit")
    private(model, "_symbolic_build", "build_before_fit")
    private(model, "_maybe_symbolic_build", "build_before_fit")

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
    import keras
    
    found = []
    for layer in private(model, "_flatten_layers", "seed_generators")(include_self=True, recursive=True):
        found.extend(v for v in vars(layer).values() if isinstance(v, keras.random.SeedGenerator))
    return found


def without_autotune_thread(dataset):
    """The data set with tf.data's autotuner off, so that deleting its iterator is instant.

    The autotuner runs a thread beside each iterator that sleeps between rounds, 10 ms at
    first and twice as long each round, up to a minute, and deleting the iterator waits for
    that sleep to end (TensorFlow 2.21, seen in a gdb stack: `~RootDataset::Iterator` waits on
    `Model::OptimizeLoop`). `fit` deletes one iterator an epoch, so each epoch waited until
    the next 10 ms x (2^k - 1) mark: gan's 45 s epochs took 82 s, the old gan recipe's 85 s
    epochs 142 s, and short epochs waited up to 1 s. Without it, parameters left to AUTOTUNE
    take fixed values (parallel calls: the cores; prefetch: a buffer that grows as needed),
    which ran as fast here.
    """
    import tensorflow as tf
    
    if not isinstance(dataset, tf.data.Dataset):  # None (no validation data) or arrays
        return dataset
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def array_data_without_autotune() -> None:
    """Make the tf.data set Keras builds from arrays skip the autotuner (see
    `without_autotune_thread`).

    `model.predict(x)` on arrays makes one iterator a call and deletes it at the end, so each
    call waited until the autotuner's next round: cnn's predict of 1,700 images took 1.30-1.32 s
    in 4 of 6 calls as Keras ships it, 0.70-0.82 s in all 6 with this (`python
    benchmarks/engine_costs.py autotune --data DIR --rounds 2 --epochs 3`). dlcli's own array
    calls (gan's KID after each epoch, the autoencoder's and finetune's evaluation, caption's
    image features) all go through here.

    Example:
        >>> import numpy as np
        >>> array_data_without_autotune()
        >>> from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
        >>> ArrayDataAdapter(np.zeros((4, 2))).get_tf_dataset().options().autotune.enabled
        False
    """
    adapter = private("keras.src.trainers.data_adapters.array_data_adapter", "ArrayDataAdapter",
                      "array_data_without_autotune")
    private(adapter, "get_tf_dataset", "array_data_without_autotune")

    def get_tf_dataset(self):
        return without_autotune_thread(get_tf_dataset.original(self))

    _replace_once(adapter, "get_tf_dataset", get_tf_dataset)


def _replace_once(owner, name: str, replacement) -> None:
    """Put `replacement` in place of `owner.name`, once per process (a second call keeps the
    first); it finds what it replaced as `replacement.original`, which tests also use."""
    original = getattr(owner, name)
    if getattr(original, "dlcli_patched", False):
        return
    replacement.dlcli_patched = True
    replacement.original = original
    setattr(owner, name, replacement)


def fused_cross_entropy_on_cpu() -> None:
    """Give sparse softmax cross-entropy its fused kernel back under op determinism, where
    no GPU is visible.

    With `enable_op_determinism` (which exact resume needs), TensorFlow 2.21 computes
    `tf.nn.sparse_softmax_cross_entropy_with_logits`, behind every
    `sparse_categorical_crossentropy` loss, as log-softmax, a gather and a NaN mask for bad
    labels, because its GPU kernel is not deterministic. The CPU kernel is (each row reduced by
    one thread, in a fixed order). The fused kernel measured 1-2 % faster epochs for names and
    for mnist's `fit(x, y)` (`python benchmarks/engine_costs.py cross-entropy --data DIR`). It
    refuses a label out of range with an error instead of a NaN loss, as it does without
    determinism. With a GPU the composite stays.

    Example:
        >>> import tensorflow as tf
        >>> tf.config.experimental.enable_op_determinism()
        >>> fused_cross_entropy_on_cpu()
        >>> f = tf.function(lambda x, y: tf.nn.sparse_softmax_cross_entropy_with_logits(y, x))
        >>> graph = f.get_concrete_function(tf.zeros((2, 3)), tf.zeros((2,), tf.int32)).graph
        >>> "SparseSoftmaxCrossEntropyWithLogits" in [op.type for op in graph.get_operations()]
        True
    """
    import tensorflow as tf
    
    from tensorflow.python.ops import gen_nn_ops, nn_ops

    name = "_sparse_softmax_cross_entropy_with_rank_2_logits"
    private(nn_ops, name, "fused_cross_entropy_on_cpu")
    if tf.config.list_physical_devices("GPU"):
        return

    def fused(logits, labels, name):
        return gen_nn_ops.sparse_softmax_cross_entropy_with_logits(logits, labels, name=name)[0]

    _replace_once(nn_ops, name, fused)


def cached_attr_skipsets() -> None:
    """Build Keras's attribute skip set of each saveable type once per process.

    `saving_lib.get_attr_skipset(obj_type)` (Keras 3.15) lists the attributes that a dummy
    `Layer()`, `Optimizer(1.0)` or `Metric()` has, so that saving and loading walk only what a
    model adds. It caches the set under `saving_attr_skipset_...` but looks it up under
    `saving_attr_skiplist_...`, so it never finds it: each `model.save` and `load_model` builds
    those dummies again for every object it walks: 70 times a save of mnist's model, whose
    `model.save` takes 0.017 s with this and 0.024 s without (cProfile: a third of its time
    went to the dummies). The set depends only on the type.

    Example:
        >>> cached_attr_skipsets()
        >>> from keras.src.saving import saving_lib
        >>> saving_lib.get_attr_skipset("Layer") is saving_lib.get_attr_skipset("Layer")
        True
    """
    saving_lib = importlib.import_module("keras.src.saving.saving_lib")
    private(saving_lib, "get_attr_skipset", "cached_attr_skipsets")
    built: dict = {}

    def get_attr_skipset(obj_type):
        if obj_type not in built:
            built[obj_type] = get_attr_skipset.original(obj_type)
        return built[obj_type]

    _replace_once(saving_lib, "get_attr_skipset", get_attr_skipset)


@functools.cache
def step_callbacks_class():
    """The StepCallbacks class (a Keras CallbackList), defined on first use.

    Keras's own list converts every step's logs to Python floats before it calls the
    callbacks, as soon as one callback has a per-step hook (the StepWatcher has), and a
    float of a tensor waits for the step to finish: the host cannot queue the next step
    meanwhile. Measured on mnist's MLP at batch 16 (3,250 steps an epoch, 2 idle cores): an
    epoch took 6.7-10.2 s with this list against 9.7-12.2 s with Keras's. This list
    hands the engine's callbacks (`reads_tensor_logs`) the step's logs as they are: they
    read them only where they need them. Other callbacks still get floats.
    """
    import keras

    pythonify_logs = private("keras.src.utils.python_utils", "pythonify_logs", "step_callbacks_class")
    for name in ("_on_train_batch_end", "_async_train"):
        if not hasattr(keras.callbacks.CallbackList([]), name):
            private(keras.callbacks.CallbackList, name, "step_callbacks_class")

    class StepCallbacks(keras.callbacks.CallbackList):
        def __init__(self, callbacks, **params):
            super().__init__(callbacks, add_history=True, **params)
            self._async_train = False  # the StepWatcher saves checkpoints between steps
            default = keras.callbacks.Callback.on_train_batch_end
            self.wants_floats = [c for c in self.callbacks if type(c).on_train_batch_end is not default
                                 and not getattr(c, "reads_tensor_logs", False)]

        def _on_train_batch_end(self, batch, logs=None):
            floats = None
            for callback in self.callbacks:
                if callback in self.wants_floats:
                    floats = floats if floats is not None else pythonify_logs(logs)  # as Keras's own list
                    callback.on_train_batch_end(batch, logs=floats)
                else:
                    callback.on_train_batch_end(batch, logs=logs)

    return StepCallbacks


@functools.cache
def epoch_tensorboard_class():
    """Keras's TensorBoard callback, writing per epoch only (what `fit` uses).

    With the default `update_freq="epoch"` Keras's callback still calls `summary.scalar`
    for every metric at every step (which writes nothing, having no writer, but converts
    and dispatches each value); this one skips that and writes the model's graph as Keras does.
    """
    import keras

    private(keras.callbacks.TensorBoard, "_write_keras_model_train_graph", "epoch_tensorboard_class")

    class EpochTensorBoard(keras.callbacks.TensorBoard):
        reads_tensor_logs = True

        def on_train_batch_end(self, batch, logs=None):
            if private(self, "_should_write_train_graph", "epoch_tensorboard_class"):
                self._write_keras_model_train_graph()
                self._should_write_train_graph = False

    return EpochTensorBoard


@functools.cache
def warm_ema_adam_class():
    """Adam whose weight average (Keras's `use_ema`) decays at min(ema, (1 + t) / (10 + t)) at
    step t: plain EMA at 0.999 would average over the first thousand steps, random start
    included, which is most of a short run; the warm-up averages over about the last t/10.
    Defined on first use: importing this module loads no TensorFlow."""
    import keras

    class WarmEmaAdam(keras.optimizers.Adam):
        @property
        def ema_momentum(self):
            top = self._ema_top
            if not getattr(self, "_ema_warm", False):  # while Keras sets it up
                return top
            t = keras.ops.cast(self.iterations, "float32")
            return keras.ops.minimum(top, (1.0 + t) / (10.0 + t))

        @ema_momentum.setter
        def ema_momentum(self, value):
            self._ema_top = value

        def build(self, variables):
            super().build(variables)
            self._ema_warm = True

    return WarmEmaAdam


def ema_averages(optimizer) -> list:
    """The moving averages of the weights an optimizer with `use_ema` keeps, in the order of its
    variables: Keras has no public way to read them without swapping them into the model."""
    return private(optimizer, "_model_variables_moving_average", "ema_averages")


def model_snapshot(model):
    """`write(path)`: the .keras file `model.save(path)` writes now, written whenever it is
    called, from values taken here, so that training may go on meanwhile.

    What takes time in a save is building the weights' HDF5 file, the zip and the disk write
    (the autoencoder's 10 MB: 66 ms of its 70 ms); taking the config and a copy of every
    value costs a third of that. The copy is taken through Keras's own saving walk
    (`_save_state`, into a store that keeps each value), so the file holds what a save at
    this moment holds: weights, optimizer state, metric and seed states, the rate in the
    optimizer's config. A model with assets (a lookup layer's vocabulary, written as files)
    is saved whole into memory here instead.
    """
    import io
    import zipfile

    import keras
    import numpy as np

    saving_lib = importlib.import_module("keras.src.saving.saving_lib")
    names = ("_serialize_model_as_json", "_save_state", "H5IOStore", "DiskIOStore", "save_model",
             "_VARS_FNAME_H5", "_CONFIG_FILENAME", "_METADATA_FILENAME")
    serialize, save_state, h5_store, disk_store, save_model, weights_name, config_name, metadata_name = (
        private(saving_lib, name, "model_snapshot") for name in names)

    class Values(h5_store):
        """The weights store Keras's saving walk writes to, keeping a copy of each value."""

        def __init__(self):  # no HDF5 file: the values are written later
            self.entries: list = []

        def make(self, path, metadata=None):
            self.entries.append((path, metadata, {}))
            return self

        def __setitem__(self, key, value):  # as H5IOStore converts it, then a copy of its own
            self.entries[-1][2][key] = np.array(keras.ops.convert_to_numpy(value), copy=True)

        def __bool__(self):
            return True

    class Assets(disk_store):
        """An assets store that only notes that the model has assets."""

        def __init__(self):
            self.used = False

        def make(self, path):
            self.used = True
            raise _HasAssets

    config_json, metadata_json = serialize(model)
    values, assets = Values(), Assets()
    try:
        save_state(model, weights_store=values, assets_store=assets, inner_path="", visited_saveables=set())
    except _HasAssets:
        whole = io.BytesIO()
        save_model(model, whole)
        data = whole.getvalue()

        def write_whole(path):
            with open(path, "wb") as fh:
                fh.write(data)

        return write_whole

    def write(path):
        with open(path, "wb") as fh, zipfile.ZipFile(fh, "w") as archive:
            with archive.open(metadata_name, "w") as f:
                f.write(metadata_json.encode())
            with archive.open(config_name, "w") as f:
                f.write(config_json.encode())
            store = h5_store(weights_name, archive=archive, mode="w")
            try:
                for inner_path, metadata, entry in values.entries:
                    group = store.make(inner_path, metadata=metadata)
                    for key, value in entry.items():
                        group[key] = value
            finally:
                store.close()

    return write


class _HasAssets(Exception):
    """Raised out of Keras's saving walk where the model has assets (see `model_snapshot`)."""
