"""Task mnist end to end on tiny generated digits: train, eval, predict, views, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dlcli.tasks import mnist
from tests.conftest import assert_drawn, digit_images, render_digit

FAST = ["--epochs", "2", "--batch-size", "32", "--set", "val_size=50", "--quiet"]


@pytest.fixture
def trained(cli, digits_npz):
    out = cli.json("train", "mnist", "--dataset", f"npz:{digits_npz}", "--run", "tiny", *FAST, "--epochs", "6")
    return out


def test_train_writes_a_complete_run_and_learns(trained, cli):
    run_dir = cli.root / "mnist" / "tiny"
    for name in ("config.yaml", "model.keras", "history.csv", "metrics.json", "classes.json"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard logs
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 6
    assert trained["metrics"]["test_accuracy"] > 0.8  # the classes are easy; chance is 0.1


def test_eval_matches_training_metrics(trained, cli, digits_npz):
    metrics = cli.json("eval", "mnist")["metrics"]
    assert metrics["test_examples"] == 50
    assert metrics["test_accuracy"] == pytest.approx(trained["metrics"]["test_accuracy"], abs=1e-6)


def test_eval_on_other_data_uses_its_test_split_or_all_of_it(trained, cli, tmp_path):
    """Other data without a test split is evaluated whole, and a
    folder of some of the digits has its labels matched to the run's classes by name."""
    x, y = digit_images(3, seed=7)
    # an npz of x_train/y_train only: the loader evaluates all of it, but the CLI's pre-check
    # (data.check_dataset, commit e67d01e) still asks eval for x_test/y_test, so it is tested here
    np.savez(tmp_path / "train_only.npz", x_train=x, y_train=y)
    images, labels, prefix = mnist.other_eval_arrays({**mnist.DEFAULTS, "dataset": f"npz:{tmp_path / 'train_only.npz'}"},
                                                     mnist.DIGITS)
    assert len(images) == 30 and prefix == "" and (labels == y).all()
    folder = tmp_path / "digits"
    for i, (img, label) in enumerate(zip(x, y)):
        if label in (3, 7):  # two classes only: tfds would number them 0 and 1
            (folder / "test" / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / "test" / str(label) / f"{i}.png")
    metrics = cli.json("eval", "mnist", "--dataset", f"folder:{folder}")["metrics"]
    assert metrics["test_examples"] == 6 and metrics["test_accuracy"] > 0.5
    assert cli.json("eval", "mnist")["metrics"]["test_examples"] == 50  # the run's own test split


def _save(img: np.ndarray, path, size=(90, 120), invert=False, rgb=True):
    data = 255 - img if invert else img
    pic = Image.fromarray(data.astype(np.uint8)).resize(size)
    (pic.convert("RGB") if rgb else pic).save(path)
    return path


def test_predict_any_image_size_colour_and_polarity(trained, cli, tmp_path):
    rng = np.random.default_rng(11)
    y = [3, 7]
    light = _save(render_digit(3, rng), tmp_path / "light.png", invert=True)  # dark on white, RGB, 120x90
    dark = _save(render_digit(7, rng), tmp_path / "dark.jpg", size=(33, 33), rgb=False)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = cli("predict", "mnist", light, dark, bad, "--top-k", "3", "--json", expect=2)
    rows = json.loads(result.stdout)
    assert [r["input"] for r in rows] == [str(light), str(dark), str(bad)]
    assert rows[0]["digit"] == y[0] and rows[1]["digit"] == y[1]
    assert len(rows[0]["top"]) == 3 and rows[0]["top"][0]["probability"] >= rows[0]["top"][1]["probability"]
    assert "notes.png: not an image" in rows[2]["error"] and "1 of 3 inputs failed" in result.stderr


def test_to_mnist_centres_and_normalises():
    img = np.full((60, 40), 255, np.uint8)
    img[5:25, 3:9] = 0  # a dark stroke in a corner of a light image
    digit = mnist.to_mnist(img)
    assert digit.shape == (28, 28) and digit.max() == pytest.approx(1.0, abs=0.01)
    rows, cols = np.nonzero(digit > 0.5)
    assert abs(rows.mean() - 13.5) < 2 and abs(cols.mean() - 13.5) < 2
    assert digit[0].max() == 0 and digit[:, 0].max() == 0  # background is black


def test_views(trained, cli):
    for view in ("mnist-confusion", "mnist-errors", "training-curves"):
        data = cli.json("visualize", view, "--task", "mnist") if view == "training-curves" else cli.json("visualize", view)
        assert_drawn(data["path"])


def test_models_build_with_the_expected_shapes():
    cfg = dict(mnist.DEFAULTS)
    sizes = {}
    for name in ("softmax", "mlp", "cnn"):
        model = mnist.build_model({**cfg, "model": name})
        assert model.output_shape == (None, 10)
        sizes[name] = model.count_params()
    assert sizes["softmax"] == 7850
    assert sizes["mlp"] == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def test_image_folder_data_through_tfds(cli, tmp_path):
    x, y = digit_images(6, seed=3)
    for split, part in (("train", slice(0, 50)), ("test", slice(50, 60))):
        for i, (img, label) in enumerate(zip(x[part], y[part])):
            folder = tmp_path / "folder" / split / f"d{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).convert("RGB").save(folder / f"{i}.png")
    out = cli.json("train", "mnist", "--dataset", f"folder:{tmp_path / 'folder'}", *FAST, "--epochs", "1")
    classes = json.loads((cli.root / "mnist" / os.path.basename(out["run"]) / "classes.json").read_text())
    assert classes == [f"d{i}" for i in range(10)]
    assert cli.json("eval", "mnist")["metrics"]["test_examples"] == 10


def test_corrupt_checkpoint_is_a_clear_error(trained, cli, tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 this is not really a zip")
    result = cli("eval", "mnist", "--checkpoint", broken, expect=2)
    assert "broken.keras" in result.stderr and "not a Keras model file" in result.stderr
    linear_model = tmp_path / "m.npz"
    np.savez(linear_model, w=np.zeros(3))
    result = cli("eval", "mnist", "--checkpoint", linear_model, expect=2)
    assert "not a Keras model file" in result.stderr
    import keras

    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)], name="cnn_course")
    other.save(tmp_path / "other.keras")
    result = cli("eval", "mnist", "--checkpoint", tmp_path / "other.keras", expect=2)
    assert "holds model 'cnn_course', not a mnist model" in result.stderr


@pytest.mark.parametrize("interval", ["0", "1.5"])  # every epoch a checkpoint; or once 1.5 s have passed
def test_resume_after_sigkill_matches_an_uninterrupted_run(cli, tmp_path, root, interval):
    x, y = digit_images(300, seed=5)  # enough batches that an epoch lasts about a second
    data = tmp_path / "more.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    args = ["mnist", "--dataset", f"npz:{data}", "--epochs", "5", "--batch-size", "8",
            "--set", "val_size=50", "--set", f"save_interval_seconds={interval}", "--runs-dir", str(root), "--quiet"]
    cli.runner.invoke(__import__("dlcli.cli").cli.app, ["train", *args, "--run", "straight"])
    proc = subprocess.Popen([sys.executable, "-m", "dlcli", "train", *args, "--run", "killed"])
    backup = root / "mnist" / "killed" / "backup"
    deadline = time.monotonic() + 120
    while not any(int(done.parent.name.split("-")[1]) >= 2 for done in backup.glob("epoch-*/state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "mnist" / "killed" / "metrics.json").exists()
    result = cli.runner.invoke(__import__("dlcli.cli").cli.app, ["train", *args, "--run", "killed", "--resume"])
    assert result.exit_code == 0, result.stderr
    straight = (root / "mnist" / "straight" / "history.csv").read_text()
    resumed = (root / "mnist" / "killed" / "history.csv").read_text()
    assert resumed == straight


def test_predict_json_digits_are_numbers_and_photos_get_a_note(trained, cli, tmp_path):
    rng = np.random.default_rng(3)
    digit = _save(render_digit(3, rng), tmp_path / "three.png", invert=True)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (12, 16), dtype=np.uint8)).resize((160, 120), Image.BICUBIC))
    photo = tmp_path / "owl.jpg"
    Image.fromarray(np.stack([smooth, np.roll(smooth, 9, 1), smooth // 2], -1)).save(photo)  # tones everywhere
    rows = cli.json("predict", "mnist", digit, photo, "--top-k", "2")
    assert isinstance(rows[0]["digit"], int) and all(isinstance(r["digit"], int) for r in rows[0]["top"])
    assert "note" not in rows[0]
    assert "does not look like a digit" in rows[1]["note"]
    text = cli("predict", "mnist", digit, photo).stdout
    assert "owl.jpg: digit" in text and "does not look like a digit" in text
    assert "probability 0." in text and all(len(p.split()[0]) == 6 for p in text.split("probability ")[1:])  # 0.xxxx


def test_npz_labels_out_of_range_are_one_clear_line(cli, tmp_path):
    x, y = digit_images(2, seed=1)
    np.savez(tmp_path / "fifty.npz", x_train=x, y_train=y * 5 + 4, x_test=x, y_test=y)
    result = cli("train", "mnist", "--dataset", f"npz:{tmp_path / 'fifty.npz'}", *FAST, expect=2)
    assert "y_train has labels 4-49; the model has 10 classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_checkpoint_of_another_task_is_named(trained, cli, tmp_path):
    cli("train", "linear", "--epochs", "1", "--run", "lin", "--quiet")
    result = cli("eval", "mnist", "--checkpoint", cli.root / "linear" / "lin" / "model.npz", expect=2)
    assert "holds a linear model, not a mnist model" in result.stderr
    result = cli("predict", "linear", "1,1", "--run", "tiny", "--checkpoint", cli.root / "mnist" / "tiny" / "model.keras", expect=2)
    assert "holds a mnist model, not a linear model" in result.stderr


def test_unit_float_is_the_naive_scaling_to_the_bit_in_float32():
    """The in-place scaling every image task uses gives exactly `x.astype(float32) / 255 - m`."""
    from dlcli.data import sources as data

    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for minus in (0.0, 0.5):
        got = data.unit_float(x, minus=minus)
        assert got.dtype == np.float32
        assert np.array_equal(got, x.astype("float32") / 255.0 - minus)
    assert data.unit_float(x).max() == 1.0 and data.unit_float(x, minus=0.5).min() == -0.5


def test_training_batches_scale_in_the_pipeline_to_the_same_bits():
    """mnist trains on uint8 digits scaled batch by batch: the batches are, bit for bit, those
    of the arrays scaled beforehand (as evaluation and the plain-Keras reference scale them)."""
    from dlcli.engine import training

    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(256, dtype=np.uint8).repeat(49).reshape(-1, 28, 28),
                        rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)])
    y = rng.integers(0, 10, len(x))
    cfg = {"batch_size": 32, "seed": 3}
    in_pipeline, steps = mnist.training_epochs(x, y, cfg)
    beforehand, _ = training.array_epochs(mnist.scale(x), y, 32, 3)
    assert steps == -(-len(x) // 32)
    for epoch in (0, 1):
        for (xa, ya), (xb, yb) in zip(in_pipeline(epoch), beforehand(epoch), strict=True):
            assert xa.dtype == xb.dtype == "float32"
            assert np.array_equal(xa.numpy().view(np.uint32), xb.numpy().view(np.uint32))
            assert np.array_equal(ya, yb)
