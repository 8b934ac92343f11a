"""Each Keras workaround of dlcli/keras_workarounds.py, checked against the installed Keras:
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

    from dlcli import seeding
    from dlcli.keras_workarounds import seed_generators

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
    from dlcli.keras_workarounds import build_before_fit
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
from dlcli import training  # noqa: E402  (dlcli's first use of Keras installs the workaround)

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

    from dlcli.keras_workarounds import array_data_without_autotune

    array_data_without_autotune()
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    original = ArrayDataAdapter.get_tf_dataset.original
    assert original(ArrayDataAdapter(np.zeros((4, 2)))).options().autotune.enabled is not False
