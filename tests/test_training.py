"""The shared training loop's own pieces (the tasks' tests run it end to end)."""

import keras
import tensorflow as tf

from dlcli.engine import keras_workarounds, training


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(logs)


def test_step_callbacks_hand_tensors_to_the_engine_and_floats_to_the_rest():
    engine, other = Recorder(), Recorder()
    engine.reads_tensor_logs = True
    callbacks = keras_workarounds.step_callbacks_class()([engine, other], verbose=0, epochs=1, steps=1)
    loss = tf.constant(1.5)
    callbacks.on_train_batch_end(0, {"loss": loss})
    assert engine.seen == [{"loss": loss}] and engine.seen[0]["loss"] is loss  # not waited for
    assert other.seen == [{"loss": 1.5}] and isinstance(other.seen[0]["loss"], float)
    assert not callbacks._async_train  # checkpoints between steps: the callbacks run in step order
    assert any(isinstance(c, keras.callbacks.History) for c in callbacks.callbacks)  # fit's return value


def test_tensorboard_writes_no_per_step_summaries(tmp_path, monkeypatch):
    board = keras_workarounds.epoch_tensorboard_class()(log_dir=str(tmp_path), profile_batch=0)
    written = []
    monkeypatch.setattr(tf.summary, "scalar", lambda *a, **k: written.append(a))
    board._should_write_train_graph = False
    board.on_train_batch_end(0, {"loss": 1.0, "accuracy": 0.5})
    assert written == []


def test_without_autotune_thread_keeps_the_elements_and_turns_the_autotuner_off():
    ds = tf.data.Dataset.range(10).batch(4).prefetch(tf.data.AUTOTUNE)
    quiet = training.without_autotune_thread(ds)
    assert ds.options().autotune.enabled is not False  # left as it was
    assert quiet.options().autotune.enabled is False
    assert [b.tolist() for b in quiet.as_numpy_iterator()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert training.without_autotune_thread(None) is None  # no validation data
    arrays = ([1.0], [2.0])
    assert training.without_autotune_thread(arrays) is arrays  # only tf.data data sets change


def test_fit_trains_every_epoch_in_one_keras_call_without_the_autotune_thread(cli, minimal, monkeypatch):
    """Deleting an autotuned iterator waits out the autotuner's sleep (up to a minute): fit must
    give model.fit data sets whose autotuner is off, and one call for all epochs (a call of its
    own an epoch costs its set-up every epoch)."""
    from tests import minimal_task

    seen = []
    original = keras.Model.fit

    def spy(self, x=None, *args, **kwargs):
        seen.append((x.options().autotune.enabled, kwargs["initial_epoch"], kwargs["epochs"]))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    cli("train", "minimal", "--run", "quiet", "--quiet")
    assert seen == [(False, 0, minimal_task.DEFAULTS["epochs"])]


def _epochs_of(calls):
    return [(first, end, skipped, [b.tolist() for b in data.as_numpy_iterator()]) for first, end, data, skipped in calls]


def test_fit_calls_join_the_epochs_data_in_order_and_train_a_resumed_epoch_alone():
    def train_data(epoch):  # 2 batches an epoch, numbered by the epoch
        return tf.data.Dataset.range(epoch * 10, epoch * 10 + 4).batch(2)

    assert _epochs_of(training.fit_calls(train_data, 0, 0, 3, 2)) == [
        (0, 3, 0, [[0, 1], [2, 3], [10, 11], [12, 13], [20, 21], [22, 23]])]
    # resumed after one batch of epoch 2 (index 1): its other batch alone, then the rest together
    assert _epochs_of(training.fit_calls(train_data, 1, 1, 4, 2)) == [
        (1, 2, 1, [[12, 13]]), (2, 4, 0, [[20, 21], [22, 23], [30, 31], [32, 33]])]
    assert list(training.fit_calls(train_data, 3, 0, 3, 2)) == []  # nothing left to train


def test_fit_calls_join_no_more_epochs_than_their_graphs_budget(monkeypatch):
    """Opening a joined data set copies every piece's captured arrays: a call joins at most
    JOINED_GRAPH_BYTES of them."""
    import numpy as np

    pixels = tf.constant(np.zeros((1000, 256), np.float32))  # 1 MB, captured by every epoch's piece

    def train_data(epoch):
        return tf.data.Dataset.from_tensor_slices(pixels).batch(500)

    size = training.graph_bytes(train_data(0))
    assert size > pixels.numpy().nbytes
    monkeypatch.setattr(training, "JOINED_GRAPH_BYTES", 2 * size)
    assert [(first, end) for first, end, _, _ in training.fit_calls(train_data, 0, 0, 5, 2)] == [(0, 2), (2, 4), (4, 5)]
    monkeypatch.setattr(training, "JOINED_GRAPH_BYTES", size // 2)
    assert [(first, end) for first, end, _, _ in training.fit_calls(train_data, 0, 0, 3, 2)] == [(0, 1), (1, 2), (2, 3)]


def test_fit_calls_give_each_epoch_its_own_call_where_its_batches_are_not_steps():
    def uneven(epoch):  # epoch 1 has 3 batches: joined, it would take a batch of epoch 2
        return tf.data.Dataset.range(2 + epoch % 2).batch(1)

    assert [(first, end) for first, end, _, _ in training.fit_calls(uneven, 0, 0, 3, 2)] == [(0, 1), (1, 2), (2, 3)]
    unknown = lambda epoch: tf.data.Dataset.range(4).filter(lambda v: v >= 0).batch(2)  # noqa: E731
    assert [(first, end) for first, end, _, _ in training.fit_calls(unknown, 0, 0, 2, 2)] == [(0, 1), (1, 2)]
    assert [(first, end) for first, end, _, _ in training.fit_calls(unknown, 0, 0, 2, None)] == [(0, 1), (1, 2)]


def _dense_model():
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="minimal_dense")
    model.compile("adam", "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    return model


def test_a_checkpoint_written_beside_training_holds_the_state_it_was_taken_at(tmp_path):
    import json

    import numpy as np

    from dlcli.runs.run import BackupWriter, Run

    import threading

    from dlcli.runs.files import Snapshot

    run = Run.create(tmp_path, "minimal", "r")
    model, history = _dense_model(), [{"epoch": 1, "loss": 0.5}]
    kernel = np.asarray(model.layers[0].kernel)
    trained_on = threading.Event()  # the thread writes the model file only once training has gone on
    files = {"gate": Snapshot(lambda path: trained_on.wait(30) and path.write_text("")),
             **training.CheckpointState().files(model)}
    writer = BackupWriter(run)
    writer.save(1, history, files, extra={"loss": 0.5}, then=lambda: run.write_history(list(history)))
    model.layers[0].kernel.assign(kernel + 1.0)  # training goes on while the checkpoint is written
    history.append({"epoch": 2, "loss": 0.25})
    trained_on.set()
    writer.wait()
    backup = run.latest_backup()
    assert backup.name == "epoch-0001" and not list(run.backup_dir.glob(".*"))
    saved = training.load_model(backup / "model.keras")
    np.testing.assert_array_equal(np.asarray(saved.layers[0].kernel), kernel)
    assert json.loads((backup / "state.json").read_text())["history"] == [{"epoch": 1, "loss": 0.5}]
    assert run.history_path.exists()  # `then`, after the checkpoint is in place


def test_a_checkpoint_failing_in_its_thread_is_the_run_error_of_the_next_wait(tmp_path):
    import errno

    import pytest

    from dlcli.errors import RunError
    from dlcli.runs.files import Snapshot
    from dlcli.runs.run import BackupWriter, Run

    run = Run.create(tmp_path, "minimal", "r")
    model = _dense_model()
    writer = BackupWriter(run)
    writer.save(1, [], training.CheckpointState().files(model))

    def full(path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.save(2, [], {"model.keras": Snapshot(full)}, then=lambda: run.write_history([]))
    with pytest.raises(RunError, match=r"no space left on the device while writing .*epoch-0002; "
                                       r"the previous checkpoint is intact"):
        writer.wait()
    assert [p.name for p in run.backup_dir.iterdir()] == ["epoch-0001"]  # no temporary directory left
    assert not run.history_path.exists()  # `then` runs only after its checkpoint is in place
    writer.wait()  # the error is raised once
    writer.save(2, [], training.CheckpointState().files(model))
    writer.wait()
    assert run.latest_backup().name == "epoch-0002"


class _Watcher:
    """What EpochCheckpoint reads of the StepWatcher: whether the epoch was cut short, and the signal."""

    def __init__(self):
        self.cut_short = False
        self.stop = type("Stop", (), {"requested": False})()


def _epoch_checkpoint(interval: float, last_epoch: int, seconds_per_epoch: float = 4.0):
    """An EpochCheckpoint on a clock that moves `seconds_per_epoch` an epoch: (callback, saved
    epochs, a function that ends an epoch)."""
    clock = {"now": 0.0, "taken": 0.0}
    saved = []

    def end(epoch, logs, save):
        if save:
            saved.append(epoch + 1)
            clock["taken"] = clock["now"]

    callback = training.epoch_checkpoint_class()(_Watcher(), end, last_epoch, interval,
                                                  lambda: clock["now"] - clock["taken"])
    model = keras.Sequential()
    model.stop_training = False  # as `fit` sets it
    callback.set_model(model)

    def epoch_ends(epoch):
        clock["now"] += seconds_per_epoch
        callback.on_epoch_end(epoch, {"loss": 1.0})

    return callback, saved, epoch_ends


def test_epoch_checkpoints_wait_for_their_interval_and_the_last_epoch_always_saves():
    _, saved, epoch_ends = _epoch_checkpoint(interval=10, last_epoch=8)
    for epoch in range(8):
        epoch_ends(epoch)
    assert saved == [3, 6, 8]  # 12 s after the start, 12 s after epoch 3, and the last
    _, every, epoch_ends = _epoch_checkpoint(interval=0, last_epoch=4)
    for epoch in range(4):
        epoch_ends(epoch)
    assert every == [1, 2, 3, 4]


def test_a_signal_or_a_task_ending_training_saves_the_epoch_before_its_interval():
    callback, saved, epoch_ends = _epoch_checkpoint(interval=1000, last_epoch=10)
    epoch_ends(0)
    callback.model.stop_training = True  # a task's callback, earlier in the list, ends training
    epoch_ends(1)
    callback.model.stop_training = False
    callback.watcher.stop.requested = True  # SIGTERM during epoch 3's last step
    epoch_ends(2)
    assert saved == [2, 3] and callback.model.stop_training and callback.epochs_done == 3
    callback.watcher.cut_short = True  # a NaN or a mid-epoch stop: the watcher saves (or refuses), not this
    epoch_ends(3)
    assert saved == [2, 3] and callback.epochs_done == 3


def test_a_run_of_short_epochs_checkpoints_its_last_epoch_and_writes_every_history_row(cli, minimal, root):
    import csv

    cli("train", "minimal", "--run", "short", "--quiet")  # three epochs of milliseconds, 30 s apart at least
    run = root / "minimal" / "short"
    assert [p.name for p in (run / "backup").iterdir()] == ["epoch-0003"]
    with open(run / "history.csv") as fh:
        assert [row["epoch"] for row in csv.DictReader(fh)] == ["1", "2", "3"]
    cli("train", "minimal", "--run", "every", "--set", "save_interval_seconds=0", "--quiet")
    assert sorted(p.name for p in (root / "minimal" / "every" / "backup").iterdir()) == ["epoch-0002", "epoch-0003"]
