"""The shared training loop's own pieces (the tasks' tests run it end to end)."""

import keras
import tensorflow as tf

from dlcli import training


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(logs)


def test_step_callbacks_hand_tensors_to_the_engine_and_floats_to_the_rest():
    engine, other = Recorder(), Recorder()
    engine.reads_tensor_logs = True
    callbacks = training.step_callbacks_class()([engine, other], verbose=0, epochs=1, steps=1)
    loss = tf.constant(1.5)
    callbacks.on_train_batch_end(0, {"loss": loss})
    assert engine.seen == [{"loss": loss}] and engine.seen[0]["loss"] is loss  # not waited for
    assert other.seen == [{"loss": 1.5}] and isinstance(other.seen[0]["loss"], float)
    assert not callbacks._async_train  # checkpoints between steps: the callbacks run in step order
    assert any(isinstance(c, keras.callbacks.History) for c in callbacks.callbacks)  # fit's return value


def test_tensorboard_writes_no_per_step_summaries(tmp_path, monkeypatch):
    board = training.epoch_tensorboard_class()(log_dir=str(tmp_path), profile_batch=0)
    written = []
    monkeypatch.setattr(tf.summary, "scalar", lambda *a, **k: written.append(a))
    board._should_write_train_graph = False
    board.on_train_batch_end(0, {"loss": 1.0, "accuracy": 0.5})
    assert written == []
