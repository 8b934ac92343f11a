"""Task cnn: the course's architecture, and train -> eval -> predict -> views through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dlcli.tasks import cnn
from tests.conftest import assert_drawn, shared_data

CLASSES = ("cross", "ring", "stripes")


def pattern(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A noisy RGB picture whose shape and colour depend on the class."""
    img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2 + rng.integers(-2, 3)
    if label == 0:
        mask = (abs(yy - c) < 3) | (abs(xx - c) < 3)
    elif label == 1:
        mask = abs(np.hypot(yy - c, xx - c) - size / 4) < 2.5
    else:
        mask = (xx // 4) % 2 == 0
    img[mask] = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]])[label]
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """tmp/train/<class>/*.png and tmp/test/<class>/*.png: 3 classes, 12 + 4 images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(pattern(label, rng)).save(root / split / name / f"{i:03d}.png")
    return root


def test_course_model_has_the_courses_parameter_count():
    assert cnn.course_model().count_params() == 1_084_234


def test_default_model_augments_only_in_training():
    model = cnn.default_model(10, width=8)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (4, 32, 32, 3)).astype("float32")
    augment = model.get_layer("shift")
    np.testing.assert_array_equal(np.asarray(augment(x, training=False)), x)
    assert not np.allclose(np.asarray(augment(x, training=True)), x)


def test_whitening_stem_decorrelates_2x2_patches_and_stays_frozen():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    # Smooth images: neighbouring pixels and channels are strongly correlated, as in photos.
    coarse = rng.integers(0, 256, (300, 9, 9, 1)).astype(np.float32)
    images = tf.image.resize(coarse, (32, 32), "bilinear").numpy()
    images = np.clip(images + rng.normal(0, 8, (300, 32, 32, 3)), 0, 255).astype(np.uint8)
    kernel = cnn.whitening_kernel(images, eps=1e-6)
    out = tf.nn.conv2d(cnn.scale(images), kernel, 1, "VALID").numpy().reshape(-1, 24)
    np.testing.assert_allclose(out[:, 12:], -out[:, :12], atol=1e-5)  # the negatives of the first twelve
    np.testing.assert_allclose(np.cov(out[:, :12].T), np.eye(12), atol=0.02)  # decorrelated, unit variance
    raw = np.cov(np.concatenate([cnn.scale(images)[:, i:31 + i, j:31 + j] for i in (0, 1) for j in (0, 1)], -1)
                 .reshape(-1, 12).T)
    assert np.abs(raw - np.diag(np.diag(raw))).max() > 0.5 * np.diag(raw).max()  # the patches were correlated

    cfg = {**cnn.DEFAULTS, "width": 8, "precision": "float32"}
    model = cnn.build_model(cfg, 10, images)
    np.testing.assert_allclose(np.asarray(model.get_layer("stem").kernel), cnn.whitening_kernel(images), atol=1e-6)
    first_block = [layer for layer in model.layers if isinstance(layer, type(model.get_layer("stem")))][1]
    before_stem, before_block = np.asarray(model.get_layer("stem").kernel), np.asarray(first_block.kernel)
    model.fit(cnn.scale(images[:16]), np.eye(10, dtype=np.float32)[np.arange(16) % 10], epochs=1, verbose=0)
    np.testing.assert_array_equal(np.asarray(model.get_layer("stem").kernel), before_stem)
    assert not np.allclose(np.asarray(first_block.kernel), before_block)


def test_precision_policy_is_per_model_and_survives_saving(tmp_path):
    import keras

    from dlcli.engine import precision
    from dlcli.engine import training

    cfg = {**cnn.DEFAULTS, "width": 8, "precision": "mixed_bfloat16"}
    model = cnn.build_model(cfg)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was
    assert model.get_layer("stem").compute_dtype == "bfloat16" and model.get_layer("stem").kernel.dtype == "float32"
    assert model.output.dtype == "float32"  # softmax in float32
    model.save(tmp_path / "m.keras")
    loaded = training.load_model(tmp_path / "m.keras", "cnn")
    assert loaded.get_layer("stem").compute_dtype == "bfloat16"
    assert cnn.build_model({**cfg, "precision": "float32"}).get_layer("stem").compute_dtype == "float32"
    with precision.precision("auto") as chosen:
        assert chosen == ("mixed_bfloat16" if precision.bfloat16_pays() else "float32")


@pytest.mark.parametrize("vendor, flags, pays", [
    ("GenuineIntel", "avx512f avx512_bf16 amx_bf16 amx_tile", True),
    ("GenuineIntel", "avx512f avx512_bf16", False),
    ("AuthenticAMD", "avx512f avx512_bf16", True),
    ("AuthenticAMD", "avx2 fma", False),
])
def test_auto_precision_is_bfloat16_where_the_cpu_runs_it_faster(tmp_path, monkeypatch, vendor, flags, pays):
    from dlcli.engine import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 {flags}\n\n"
                       f"processor\t: 1\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 {flags}\n")
    monkeypatch.setattr(precision, "CPUINFO", str(cpuinfo))
    assert precision.bfloat16_pays() is pays
    monkeypatch.setattr(precision, "CPUINFO", str(tmp_path / "absent"))
    assert precision.bfloat16_pays() is False and precision.cpu_flags() == set()


def test_tta_averages_an_image_with_its_mirror_and_their_shifts():
    cfg = {**cnn.DEFAULTS, "width": 8, "precision": "float32"}
    model = cnn.build_model(cfg)
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    plain, none = cnn.predict_probabilities(model, x, {**cfg, "tta": False})
    mirror_only = {**cfg, "tta_shift": 0}
    both, without = cnn.predict_probabilities(model, x, mirror_only)
    mirrored, _ = cnn.predict_probabilities(model, x[:, :, ::-1], mirror_only)
    assert none is None
    np.testing.assert_allclose(without, plain, atol=1e-6)
    np.testing.assert_allclose(mirrored, both, atol=1e-5)  # an image and its mirror: one answer
    assert not np.allclose(both, plain, atol=1e-4)  # the mirror image did change something
    shifted, _ = cnn.predict_probabilities(model, x, {**cfg, "tta_shift": 1})
    assert not np.allclose(shifted, both, atol=1e-4)
    np.testing.assert_allclose(shifted.sum(1), 1, atol=1e-5)
    metrics = cnn.accuracy_metrics(np.array([0, 1, 2, 3, 4]), both, plain)
    assert set(metrics) == {"test_loss", "test_accuracy", "test_accuracy_without_tta"}


def test_the_shifted_tta_views_move_the_image_a_pixel_each_way_with_reflected_edges():
    x = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    views = cnn.tta_views(x, {"tta": True, "tta_shift": 1})
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    mirror, down_right, up_left = views[1], views[2], views[3]
    np.testing.assert_array_equal(mirror, x[:, :, ::-1])
    np.testing.assert_array_equal(down_right[:, 1:, 1:], x[:, :-1, :-1])
    np.testing.assert_array_equal(down_right[:, 0, 1:], x[:, 1, :-1])  # the edge reflected, not repeated
    np.testing.assert_array_equal(up_left[:, :-1, :-1], x[:, 1:, 1:])
    np.testing.assert_array_equal(views[4][:, 1:, 1:], mirror[:, :-1, :-1])
    assert len(cnn.tta_views(x, {"tta": True, "tta_shift": 0})) == 2
    assert len(cnn.tta_views(x, {"tta": False, "tta_shift": 1})) == 1


def test_rate_rises_then_falls_with_the_step_count_and_course_decays():
    import keras

    cfg = {**cnn.DEFAULTS, "epochs": 10, "lr": 1.5}
    rates = [cnn.triangle(cfg, t) for t in np.linspace(0, 1, 101)]
    peak = int(np.argmax(rates))
    assert rates[peak] == pytest.approx(1.5) and peak == 23
    assert rates[0] == pytest.approx(0.3) and rates[-1] == pytest.approx(0)
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1]))
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))
    assert cnn.triangle({**cfg, "lr_end": 0.07}, 1.0) == pytest.approx(1.5 * 0.07)  # airbench's end

    # The callback sets the rate from the optimizer's step count (what a checkpoint keeps).
    model = cnn.build_model({**cfg, "width": 8, "precision": "float32"})
    callback = cnn.schedule(cfg, steps_per_epoch=4)
    callback.set_model(model)
    model.optimizer.iterations.assign(20)  # half way: 20 of 10 x 4 steps
    callback.on_train_begin()
    callback.on_train_batch_begin(0)
    assert float(model.optimizer.learning_rate) == pytest.approx(cnn.triangle(cfg, 0.5))
    callback.on_train_batch_begin(1)  # the next step's rate
    assert float(model.optimizer.learning_rate) == pytest.approx(cnn.triangle(cfg, 21 / 40))
    course = cnn.schedule({**cfg, "model": "course", "lr": 5e-3})
    assert isinstance(course, keras.callbacks.LearningRateScheduler)
    assert course.schedule(2) == pytest.approx(5e-3 * 0.81)


def test_default_model_starts_each_block_as_the_identity_with_fast_biases(tmp_path):
    from dlcli.engine import training

    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
    start = cnn.identity_start(kernel)
    x = np.random.default_rng(1).normal(size=(1, 5, 5, 4)).astype(np.float32)
    import tensorflow as tf

    out = tf.nn.conv2d(x, start, 1, "SAME").numpy()
    np.testing.assert_allclose(out[..., :4], x, atol=1e-6)  # the first four filters pass their channel on
    np.testing.assert_array_equal(start[..., 4:], kernel[..., 4:])  # the rest keep their random start

    model = cnn.build_model({**cnn.DEFAULTS, "width": 8, "precision": "float32"})
    biases = [layer for layer in model.layers if type(layer).__name__ == "ScaledBias"]
    assert len(biases) == 6 and all(layer.factor == 8 for layer in biases)
    biases[0].b.assign(np.full(8, 0.5, np.float32))
    model.save(tmp_path / "m.keras")
    loaded = training.load_model(tmp_path / "m.keras", "cnn")  # the custom layer loads
    images = np.random.default_rng(2).uniform(-0.5, 0.5, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    assert not model.get_layer("class").use_bias


def test_to_input_resizes_any_image_and_scales_like_the_course():
    x = cnn.to_input(np.full((50, 70, 3), 255, np.uint8))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x, 0.5, atol=1e-6)
    np.testing.assert_allclose(cnn.scale(np.zeros((1,), np.uint8)), [-0.5])


def test_train_eval_predict_and_every_view(cli, root, folder, tmp_path):
    dataset = f"folder:{folder}"
    out = cli.json("train", "cnn", "--dataset", dataset, "--epochs", "1", "--batch-size", "8",
                   "--width", "8", "--val-size", "6", "--run", "r1")
    run = Path(out["run"])
    metrics = out["metrics"]
    # Scored on the 12 test images: a whole number of them right. (Four steps of a batch-norm
    # model are no measure of learning; the slow test holds the course model above chance.)
    assert metrics["test_accuracy"] * 12 == pytest.approx(round(metrics["test_accuracy"] * 12), abs=1e-4)
    assert np.isfinite(metrics["test_loss"])
    assert json.loads((run / "classes.json").read_text()) == list(CLASSES)
    assert (run / "model.keras").exists() and (run / "metrics.json").exists()

    evaluated = cli.json("eval", "cnn", "--run", "r1")["metrics"]
    assert evaluated["test_examples"] == 12
    assert evaluated["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert evaluated["test_accuracy_without_tta"] == pytest.approx(metrics["test_accuracy_without_tta"], abs=1e-6)

    from PIL import Image

    photo = tmp_path / "big.jpg"  # any size: resized to 32x32
    Image.fromarray(np.kron(pattern(1, np.random.default_rng(5)), np.ones((3, 2, 1), np.uint8))).save(photo)
    rows = cli.json("predict", "cnn", str(photo), "--top-k", "3", "--run", "r1")
    assert len(rows) == 1 and rows[0]["input"] == str(photo)
    top = rows[0]["top"]
    assert [t["class"] for t in top][0] == rows[0]["class"] and {t["class"] for t in top} == set(CLASSES)
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-3)

    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a picture")
    bad = cli("predict", "cnn", str(photo), str(not_image), "--run", "r1", expect=2)
    assert "notes.txt" in bad.stderr and "big.jpg" in bad.stdout

    view_options = {"cnn-stimuli": ["--filters", "0,2", "--class-steps", "5", "--filter-steps", "3"],
                    "cnn-samples": ["--n", "6"]}
    for view in ("cnn-filters", "cnn-stimuli", "cnn-confusion", "cnn-samples"):
        shown = cli.json("visualize", view, "--run", "r1", *view_options.get(view, []))
        path = Path(shown["path"])
        assert path == run / "views" / f"{view}.png" and path.stat().st_size > 1000
        assert_drawn(path)

    wrong = cli("visualize", "cnn-stimuli", "--run", "r1", "--layer", "nope", expect=2)
    assert "--layer" in wrong.stderr


def test_the_class_stimuli_of_a_bfloat16_model_meet_its_float32_weights_in_float32(cli, folder, monkeypatch):
    """TensorFlow multiplies a bfloat16 tensor by a float32 one through its deprecated
    `sparse_matmul`, which prints a warning; the class scores cast the features up first."""
    from tensorflow.python.ops import math_ops

    cli.json("train", "cnn", "--dataset", f"folder:{folder}", "--epochs", "1", "--batch-size", "8", "--width", "8",
             "--val-size", "6", "--run", "bf16", "--set", "precision=mixed_bfloat16")

    def mixed_matmul(*args, **kwargs):
        raise AssertionError("a bfloat16 tensor met a float32 one in tf.matmul")

    monkeypatch.setattr(math_ops, "sparse_matmul", mixed_matmul)
    shown = cli.json("visualize", "cnn-stimuli", "--run", "bf16", "--filters", "0", "--class-steps", "2",
                     "--filter-steps", "1")
    assert_drawn(Path(shown["path"]))


def test_eval_on_other_data_uses_all_of_a_folder_without_a_test_split(cli, folder, tmp_path):
    """A folder with only train/ is evaluated whole, its two classes matched to the run's
    three by name."""
    from PIL import Image

    cli("train", "cnn", "--dataset", f"folder:{folder}", "--epochs", "1", "--batch-size", "8",
        "--width", "8", "--val-size", "0", "--run", "r1", "--quiet")
    other, rng = tmp_path / "other", np.random.default_rng(3)
    for label in (1, 2):
        (other / "train" / CLASSES[label]).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(pattern(label, rng)).save(other / "train" / CLASSES[label] / f"{i}.png")
    result = cli("eval", "cnn", "--run", "r1", "--dataset", f"folder:{other}", "--json")
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["examples"] == 10 and "test_accuracy" not in metrics
    rows = json.loads(cli("predict", "cnn", "--run", "r1", str(other), "--json").stdout)
    right = sum(row["class"] == Path(row["input"]).parent.name for row in rows)
    assert len(rows) == 10 and metrics["accuracy"] == pytest.approx(right / 10, abs=0.1)  # predict's own count, to one image
    assert "all 10 images" in result.stderr
    _, y, _ = cnn.other_eval_split({**cnn.DEFAULTS, "dataset": f"folder:{other}"}, list(CLASSES))
    assert sorted(set(y.tolist())) == [1, 2]  # ring and stripes keep the run's numbers
    (other / "train" / "zigzag").mkdir()
    Image.fromarray(pattern(0, rng)).save(other / "train" / "zigzag" / "0.png")
    result = cli("eval", "cnn", "--run", "r1", "--dataset", f"folder:{other}", expect=2)
    assert "never learnt: zigzag" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cnn_refuses_other_data_kinds(cli, tmp_path):
    result = cli("train", "cnn", "--dataset", "text:" + str(tmp_path), "--epochs", "1", expect=2)
    assert "folder:PATH" in result.stderr


def test_default_dataset_fails_fast_offline(cli):
    result = cli("train", "cnn", "--epochs", "1", expect=1)
    assert "cifar10" in result.stderr and "network" in result.stderr


@pytest.mark.slow
def test_course_model_learns_real_cifar10(cli):
    """One epoch of the course recipe on the shared CIFAR-10 folder is far above chance."""
    out = cli.json("train", "cnn", "--dataset", f"folder:{shared_data('cifar10')}", "--model", "course",
                   "--epochs", "1", "--batch-size", "32", "--lr", "5e-3")
    assert out["metrics"]["test_accuracy"] > 0.45


def _lookahead_model(seed: int = 0):
    import keras

    from dlcli.engine import custom_objects

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")], name="cnn_tiny")
    optimizer = custom_objects.register()["LookaheadSGD"](0.1, momentum=0.85, nesterov=True, start_epochs=1)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _train_steps(model, x, y, first: int, last: int, per_epoch: int, total: int):
    """Steps first..last-1 of a run of `total` steps, one batch each, as fit would run them."""
    import keras

    class Plan(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.model.optimizer.plan(total, per_epoch)

    for step in range(first, last):
        model.fit(x[step:step + 1], y[step:step + 1], epochs=1, verbose=0, callbacks=[Plan()])


def test_lookahead_sgd_averages_the_weights_and_keeps_the_average_in_its_checkpoint(tmp_path):
    from dlcli.engine import training

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.normal(size=(40, 3)).astype("float32")
    straight = _lookahead_model()
    _train_steps(straight, x, y, 0, 10, per_epoch=10, total=40)  # epoch 1: no average yet
    optimizer = straight.optimizer
    kernel = straight.get_layer("dense").kernel
    np.testing.assert_array_equal(np.asarray(optimizer.averages[0]), np.asarray(kernel))  # it follows the weights
    _train_steps(straight, x, y, 10, 20, per_epoch=10, total=40)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(optimizer.averages[0]))  # an epoch's end takes it

    import keras

    plain = _lookahead_model()  # the same start and steps with plain SGD end elsewhere
    plain.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.85, nesterov=True), loss="mse")
    for step in range(20):
        plain.fit(x[step:step + 1], y[step:step + 1], epochs=1, verbose=0)
    assert not np.allclose(np.asarray(plain.get_layer("dense").kernel), np.asarray(kernel), atol=1e-4)

    # Stopped mid-epoch at step 25, saved, loaded, resumed: the same weights as straight through.
    _train_steps(straight, x, y, 20, 30, per_epoch=10, total=40)
    resumed = _lookahead_model()
    _train_steps(resumed, x, y, 0, 25, per_epoch=10, total=40)
    resumed.save(tmp_path / "m.keras")
    resumed = training.load_model(tmp_path / "m.keras", "cnn")
    assert type(resumed.optimizer).__name__ == "LookaheadSGD"
    _train_steps(resumed, x, y, 25, 30, per_epoch=10, total=40)
    np.testing.assert_allclose(np.asarray(resumed.get_layer("dense").kernel), np.asarray(kernel), atol=1e-6)


def test_ema_replaces_the_weights_at_each_epochs_end_before_its_checkpoint(cli, root, folder):
    """With `ema`, every epoch's checkpoint holds weights equal to their moving average (the
    first epoch's too, not only the run's end)."""
    from dlcli.engine import keras_workarounds, training

    cli("train", "cnn", "--dataset", f"folder:{folder}", "--epochs", "2", "--batch-size", "8", "--width", "8",
        "--val-size", "0", "--set", "ema=0.5", "--set", "lookahead=0", "--set", "save_interval_seconds=0",
        "--run", "avg", "--quiet")
    first = training.load_model(root / "cnn" / "avg" / "backup" / "epoch-0001" / "model.keras")
    averages = keras_workarounds.ema_averages(first.optimizer)
    weights = first.trainable_weights
    assert len(averages) == len(weights) and int(first.optimizer.iterations.numpy()) == 5  # 36 images, 8 a batch
    for weight, average in zip(weights, averages):
        np.testing.assert_allclose(np.asarray(weight), np.asarray(average), rtol=1e-6, atol=1e-7)
