"""Keras and tf.data workarounds, each in one place with what it works around.

Each has a test in tests/test_keras_workarounds.py that fails when the workaround is no
longer needed (or no longer works), so it can be removed rather than carried on:

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
  (`dlcli.lazy`).
- `fused_cross_entropy_on_cpu`: under `enable_op_determinism` TensorFlow swaps its fused
  sparse softmax cross-entropy for a composite of about ten ops everywhere, though only its GPU
  kernel needs it; on a machine without GPUs this patches the private
  `nn_ops._sparse_softmax_cross_entropy_with_rank_2_logits` back to the fused kernel, once
  per process, from `seeding.set_seed`.
- `cached_attr_skipsets`: Keras 3.15's saving code means to build the attribute skip set of
  each saveable type once, but stores it under another key than it reads, so every save and
  load builds dummy layers and optimizers again; it wraps the private
  `saving_lib.get_attr_skipset` in a cache, once per process, at dlcli's first use of Keras.
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
    try:  # a private module: where a later Keras moves it, go on without the workaround
        from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter as adapter
    except ImportError:
        return

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
    from tensorflow.python.ops import gen_nn_ops, nn_ops

    private = "_sparse_softmax_cross_entropy_with_rank_2_logits"  # a later TensorFlow may drop it: then no workaround
    if not hasattr(nn_ops, private) or tf.config.list_physical_devices("GPU"):
        return

    def fused(logits, labels, name):
        return gen_nn_ops.sparse_softmax_cross_entropy_with_logits(logits, labels, name=name)[0]

    _replace_once(nn_ops, private, fused)


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
    try:  # a private function: where a later Keras moves it, go on without the workaround
        from keras.src.saving import saving_lib
    except ImportError:
        return
    if not hasattr(saving_lib, "get_attr_skipset"):
        return
    built: dict = {}

    def get_attr_skipset(obj_type):
        if obj_type not in built:
            built[obj_type] = get_attr_skipset.original(obj_type)
        return built[obj_type]

    _replace_once(saving_lib, "get_attr_skipset", get_attr_skipset)
