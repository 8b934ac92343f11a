"""Each Keras workaround of dlcli/engine/keras_workarounds.py, checked against the installed Keras:
still working (default run) and still needed (`pytest -m upstream`, after a Keras upgrade: a
failure there means Keras fixed the bug and the workaround can go)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_seed_generators_finds_every_random_layer_even_nested():
    import keras

    from dlcli.engine import seeding
    from dlcli.engine.keras_workarounds import seed_generators

    inner = keras.Sequential([keras.Input((4,)), keras.layers.GaussianNoise(0.1)], name="inner")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5), inner, keras.layers.Dense(2)])
    assert len(seed_generators(model)) == 2  # the private walk still reaches nested layers
    seeding.reseed_model(model, 3, epoch=1)
    states = seeding.seed_states(model)
    assert states[0] != states[1]  # each generator its own stream
    seeding.reseed_model(model, 3, epoch=2)
    assert seeding.seed_states(model) != states  # a new epoch, new noise
    seeding.restore_seed_states(model, states)
    assert seeding.seed_states(model) == states


# keras-team/keras#20585: fit() under MultiWorkerMirroredStrategy with two workers.
TWO_WORKERS = """
import sys
import numpy as np, tensorflow as tf, keras
strategy = tf.distribute.MultiWorkerMirroredStrategy()
x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype("int32"))).batch(8)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
if sys.argv[1] == "with":
    from dlcli.engine.keras_workarounds import build_before_fit
    build_before_fit(model, strategy, ds)
try:
    model.fit(ds, epochs=1, verbose=0)
    print("RESULT ok")
except Exception as exc:
    print("RESULT failed", type(exc).__name__)
"""


def _two_workers(mode: str, tmp_path: Path) -> list[str]:
    script = tmp_path / "fit.py"
    script.write_text(TWO_WORKERS)
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = [subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    return [next((line for line in out.splitlines() if line.startswith("RESULT")), "RESULT none") for out in outs]


@pytest.mark.upstream
def test_keras_20585_is_still_there_without_the_workaround(tmp_path):
    """If this fails, Keras fits two workers by itself: remove `build_before_fit`."""
    assert _two_workers("without", tmp_path) == ["RESULT failed ValueError"] * 2


ARRAY_DATA = """
import numpy as np
from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

before = ArrayDataAdapter(np.zeros((4, 2))).get_tf_dataset().options().autotune.enabled
from dlcli.engine import training  # noqa: E402  (dlcli's first use of Keras installs the workaround)

model = training.keras.Sequential([training.keras.Input((2,)), training.keras.layers.Dense(3)])
after = ArrayDataAdapter(np.zeros((4, 2))).get_tf_dataset().options().autotune.enabled
x = np.arange(10, dtype="float32").reshape(5, 2)
same = bool(np.allclose(model.predict(x, batch_size=2, verbose=0), model(x).numpy(), atol=1e-6))
print("RESULT", before, after, same)
"""


def test_dlcli_first_keras_use_turns_the_autotuner_off_for_keras_array_data():
    """A fresh process: Keras's own data set of arrays keeps tf.data's autotuner until dlcli
    first touches Keras, and skips it after, with `predict` giving the same rows."""
    out = subprocess.run([sys.executable, "-c", ARRAY_DATA], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert "RESULT None False True" in out.stdout, out.stderr[-2000:]


@pytest.mark.upstream
def test_keras_array_data_still_keeps_the_autotuner():
    """If this fails, Keras's data sets of arrays skip the autotuner by themselves: remove
    `array_data_without_autotune`."""
    import numpy as np

    from dlcli.engine.keras_workarounds import array_data_without_autotune

    array_data_without_autotune()
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    original = ArrayDataAdapter.get_tf_dataset.original
    assert original(ArrayDataAdapter(np.zeros((4, 2)))).options().autotune.enabled is not False


def _cross_entropy_graph(logits, labels):
    """(op types, loss, gradient) of sparse softmax cross-entropy as `tf.function` traces it now."""
    import tensorflow as tf

    @tf.function
    def loss_and_gradient(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, x))
        return loss, tape.gradient(loss, x)

    graph = loss_and_gradient.get_concrete_function(logits, labels).graph
    loss, gradient = loss_and_gradient(logits, labels)
    return {op.type for op in graph.get_operations()}, loss.numpy(), gradient.numpy()


def _composite_cross_entropy_graph(logits, labels):
    """`_cross_entropy_graph` with TensorFlow's own function in place of dlcli's fused one."""
    from tensorflow.python.ops import nn_ops

    patched = nn_ops._sparse_softmax_cross_entropy_with_rank_2_logits
    try:
        nn_ops._sparse_softmax_cross_entropy_with_rank_2_logits = patched.original
        return _cross_entropy_graph(logits, labels)
    finally:
        nn_ops._sparse_softmax_cross_entropy_with_rank_2_logits = patched


def test_cross_entropy_under_determinism_runs_the_fused_cpu_kernel_with_the_same_values():
    """dlcli's seeding turns op determinism on; on CPUs the loss must then still run as one
    fused kernel, and give what the composite gives (to rounding) and the same bits every time."""
    import numpy as np
    import tensorflow as tf

    from dlcli.engine import seeding

    seeding.set_seed(3)
    from tensorflow.python.framework import config

    assert config.is_op_determinism_enabled()
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(64, 10)) * 4, tf.float32)
    labels = tf.constant(rng.integers(0, 10, 64), tf.int32)
    ops, loss, gradient = _cross_entropy_graph(logits, labels)
    assert "SparseSoftmaxCrossEntropyWithLogits" in ops and "GatherV2" not in ops
    _, again_loss, again_gradient = _cross_entropy_graph(logits, labels)
    assert again_loss == loss and np.array_equal(again_gradient, gradient)
    _, composite_loss, composite_gradient = _composite_cross_entropy_graph(logits, labels)
    np.testing.assert_allclose(loss, composite_loss, rtol=1e-6)
    np.testing.assert_allclose(gradient, composite_gradient, atol=1e-6)


@pytest.mark.upstream
def test_determinism_still_swaps_the_cross_entropy_for_a_composite():
    """If this fails, TensorFlow keeps the fused kernel under op determinism by itself: remove
    `fused_cross_entropy_on_cpu`."""
    import tensorflow as tf

    from dlcli.engine import seeding

    seeding.set_seed(3)
    ops, _, _ = _composite_cross_entropy_graph(tf.zeros((2, 3)), tf.zeros((2,), tf.int32))
    assert "SparseSoftmaxCrossEntropyWithLogits" not in ops


def test_saving_builds_each_skip_set_once_and_saves_the_same_model(tmp_path):
    """After dlcli's first use of Keras, a second save and load build no skip set again, and
    the saved model still loads with its weights."""
    import numpy as np

    from dlcli.engine.lazy import lazy_import

    keras = lazy_import("keras")
    keras.utils.set_random_seed(0)
    from keras.src.saving import saving_lib

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    model.save(tmp_path / "a.keras")
    keras.models.load_model(tmp_path / "a.keras")
    patched = saving_lib.get_attr_skipset
    original, built = patched.original, []
    try:
        patched.original = lambda obj_type: built.append(obj_type) or original(obj_type)
        model.save(tmp_path / "b.keras")
        loaded = keras.models.load_model(tmp_path / "b.keras")
    finally:
        patched.original = original
    assert built == []
    np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])
    assert patched("Layer") == original("Layer")


@pytest.mark.upstream
def test_keras_saving_still_rebuilds_its_skip_sets():
    """If this fails, Keras finds its own cached skip sets: remove `cached_attr_skipsets`."""
    from dlcli.engine.lazy import lazy_import

    lazy_import("keras").layers  # dlcli's first use of Keras installs the workaround
    from keras.src.saving import saving_lib

    original = saving_lib.get_attr_skipset.original
    assert original("Layer") is not original("Layer")


def _trained_dense(seed: int = 0):
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    model.compile("adam", "mse", metrics=["mae"])
    x = np.random.default_rng(seed).normal(size=(16, 3)).astype("float32")
    model.fit(x, x[:, :2], verbose=0)
    return model, x


def _state(model) -> list:
    import numpy as np

    return [np.asarray(v) for v in [*model.weights, *model.optimizer.variables]]


def test_a_model_snapshot_is_the_file_a_save_writes_at_that_moment(tmp_path):
    """Taken, then training goes on, then written: the file is byte for byte what `model.save`
    wrote when the snapshot was taken (weights, optimizer state, the rate in its config),
    and it loads as that model."""
    import zipfile

    import numpy as np

    from dlcli.engine.keras_workarounds import model_snapshot
    from dlcli.engine.lazy import lazy_import

    keras = lazy_import("keras")
    model, x = _trained_dense()
    model.save(tmp_path / "saved.keras")
    before = _state(model)
    write = model_snapshot(model)
    model.optimizer.learning_rate.assign(0.5)
    model.fit(x, x[:, :2], epochs=2, verbose=0)  # training goes on: every variable moves
    assert not np.array_equal(_state(model)[0], before[0])
    write(tmp_path / "snapshot.keras")
    with zipfile.ZipFile(tmp_path / "saved.keras") as saved, zipfile.ZipFile(tmp_path / "snapshot.keras") as snap:
        assert saved.namelist() == snap.namelist()
        for name in ("config.json", "model.weights.h5"):
            assert saved.read(name) == snap.read(name), name
    loaded = keras.models.load_model(tmp_path / "snapshot.keras")
    for got, want in zip(_state(loaded), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_model_with_assets_is_snapshot_whole(tmp_path):
    """A lookup layer's vocabulary is written as an asset file: such a model is saved whole
    into memory when the snapshot is taken, and loads with its vocabulary."""
    import numpy as np

    from dlcli.engine.keras_workarounds import model_snapshot
    from dlcli.engine.lazy import lazy_import

    keras = lazy_import("keras")
    words = keras.Input((1,), dtype="string")
    lookup = keras.layers.StringLookup()
    lookup.adapt(["a", "b", "b"])  # an adapted vocabulary is no part of the config: an asset
    model = keras.Model(words, keras.layers.Dense(2)(keras.ops.cast(lookup(words), "float32")))
    write = model_snapshot(model)
    lookup.set_vocabulary(["c", "d", "e"])  # changed after the snapshot
    write(tmp_path / "snapshot.keras")
    loaded = keras.models.load_model(tmp_path / "snapshot.keras")
    assert [str(word) for word in loaded.layers[1].get_vocabulary()] == ["[UNK]", "b", "a"]
    np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])


@pytest.mark.upstream
def test_keras_saving_still_reads_each_variable_as_it_writes_it(tmp_path):
    """If this fails, `model.save` takes its values before it writes: `model_snapshot` can
    call it in the checkpoint writer's thread instead of replaying Keras's saving walk."""
    import numpy as np

    from dlcli.engine.lazy import lazy_import

    keras = lazy_import("keras")
    from keras.src.saving import saving_lib

    model, _ = _trained_dense()
    first, last = model.layers[0].kernel, model.layers[-1].kernel
    written = saving_lib.H5IOStore.__setitem__
    moved = []

    def setitem(self, key, value):  # training going on while the save writes
        if not moved:
            moved.append(True)
            last.assign(last + 1.0)
        return written(self, key, value)

    before = np.asarray(last)
    saving_lib.H5IOStore.__setitem__ = setitem
    try:
        model.save(tmp_path / "m.keras")
    finally:
        saving_lib.H5IOStore.__setitem__ = written
    assert first is not last
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert not np.array_equal(np.asarray(loaded.layers[-1].kernel), before)  # the value written is the later one


def test_a_moved_private_name_is_a_loud_error_naming_the_workaround():
    import keras

    from dlcli.engine.keras_workarounds import KerasInternalsChanged, private
    from dlcli.errors import RunError

    assert private(keras.callbacks.TensorBoard, "_write_keras_model_train_graph", "x") is not None
    with pytest.raises(KerasInternalsChanged) as moved:
        private(keras.callbacks.CallbackList, "_no_such_hook", "step_callbacks_class")
    message = str(moved.value)
    assert "step_callbacks_class needs CallbackList._no_such_hook" in message and "keras 3.15" in message
    assert isinstance(moved.value, RunError)  # one line and exit 1 from the CLI, not a traceback
    with pytest.raises(KerasInternalsChanged, match="keras.src.no_such_module.thing"):
        private("keras.src.no_such_module", "thing", "x")


def test_the_gan_reads_the_averaged_weights_keras_keeps_for_use_ema():
    import keras
    import numpy as np

    from dlcli.engine.keras_workarounds import ema_averages, warm_ema_adam_class

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    optimizer = warm_ema_adam_class()(0.1, use_ema=True, ema_momentum=0.5)
    model.compile(optimizer, "mse")
    for _ in range(4):  # steps, not fit: at its end fit copies the averages into the model
        model.train_on_batch(np.ones((4, 2)), np.ones((4, 1)))
    averages = ema_averages(optimizer)
    assert [a.shape for a in averages] == [v.shape for v in model.trainable_variables]
    # an average of the path the weights took: between the start and the weights now, not equal to them
    assert not np.allclose(averages[0].numpy(), model.trainable_variables[0].numpy())
    assert float(optimizer.ema_momentum) <= 0.5  # the warm-up: min(ema, (1 + t) / (10 + t))


@pytest.mark.upstream
def test_keras_callback_list_still_turns_every_steps_logs_into_floats():
    """If this fails, Keras's CallbackList hands per-step hooks the logs as they are: remove
    `step_callbacks_class`."""
    import keras
    import tensorflow as tf

    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs)

    keras.callbacks.CallbackList([Recorder()], verbose=0, epochs=1, steps=1).on_train_batch_end(0, {"loss": tf.constant(1.5)})
    assert isinstance(seen[0]["loss"], float)


@pytest.mark.upstream
def test_keras_tensorboard_still_dispatches_a_summary_per_step(tmp_path, monkeypatch):
    """If this fails, Keras's TensorBoard callback writing per epoch skips per-step summaries:
    remove `epoch_tensorboard_class`."""
    import keras
    import tensorflow as tf

    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path), profile_batch=0)
    board.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    board._should_write_train_graph = False
    board.on_train_begin()
    written = []
    monkeypatch.setattr(tf.summary, "scalar", lambda *a, **k: written.append(a))
    board.on_train_batch_end(0, {"loss": 1.0})
    board.on_train_end()
    assert written, "no summary dispatched per step"


@pytest.mark.upstream
def test_keras_has_no_public_way_to_read_the_ema_weights_or_list_seed_generators():
    """If this fails, Keras gives the moving averages of `use_ema` (or a model's seed
    generators) publicly: use it and remove `ema_averages` (or `seed_generators`)."""
    import keras

    optimizer = keras.optimizers.Adam(use_ema=True)
    public = {name for name in dir(optimizer) if not name.startswith("_")}
    assert not {n for n in public if "moving_average" in n or "ema_variables" in n}
    assert not {n for n in dir(keras.Model) if not n.startswith("_") and "seed_generator" in n}
