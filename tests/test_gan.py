"""Task gan on tiny generated faces: KID/FID, train/eval, same seed same faces, views, resume, EMA."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlcli.data import faces
from dlcli.tasks import gan
from tests.conftest import Cli, assert_drawn, draw_face, free_port, make_faces, shared_data

FAST = ["--batch-size", "16", "--set", "val_fraction=0.25", "--set", "code_size=32", "--set", "width=32",
        "--set", "kid_image_size=32", "--quiet"]


@pytest.fixture(scope="module")
def face_dir(tmp_path_factory) -> Path:
    return make_faces(tmp_path_factory.mktemp("faces"), 48, seed=1)


@pytest.fixture(scope="module")
def trained_cli(tmp_path_factory, face_dir):
    """A 2-epoch run trained straight through, and the same run killed after epoch 1 and resumed."""
    cli = Cli(tmp_path_factory.mktemp("runs"))
    data = ["--dataset", f"folder:{face_dir}", *FAST]
    straight = cli.json("train", "gan", *data, "--epochs", "2", "--run", "straight")
    cli.json("train", "gan", *data, "--epochs", "1", "--run", "resumed")
    resumed = cli.json("train", "gan", *data, "--epochs", "2", "--run", "resumed", "--resume")
    return cli, straight, resumed


@pytest.fixture
def cli(trained_cli):
    return trained_cli[0]


def face_pixels(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([faces.preprocess(np.asarray(draw_face(rng)), 90, 36) for _ in range(n)]).astype(np.float32) / 255


def test_distance_with_too_few_held_out_faces_says_so_and_uses_what_it_has():
    class Notes:
        lines = []

        def info(self, line):
            self.lines.append(line)

    cfg = {**gan.DEFAULTS, "kid_samples": 500, "kid_image_size": 32}
    notes = Notes()
    distance = gan.Distance(face_pixels(20, seed=1), cfg, notes)
    assert distance.n == 10 and "asked for 500 held-out faces a side, there are 20: using 10 against 10" in notes.lines[0]
    assert abs(distance.refs["kid_real"]) < distance.refs["kid_noise"]  # two halves of the faces: near 0; noise: far
    with pytest.raises(gan.UsageError, match="at least 4 held-out faces"):
        gan.Distance(face_pixels(3, seed=1), cfg)


def test_models_have_the_course_shapes_and_dcgan_is_the_default():
    cfg = {**gan.DEFAULTS, "seed": 0, "model": "course", "code_size": 256}
    generator, discriminator = gan.build_generator(cfg), gan.build_discriminator(cfg)
    assert generator.input_shape == (None, 256) and generator.output_shape == (None, 36, 36, 3)
    assert discriminator.output_shape == (None, 1)
    assert generator.name.startswith("gan_") and discriminator.name.startswith("gan_")
    assert gan.DEFAULTS["model"] == "dcgan"


@pytest.mark.parametrize("width", [32, gan.DEFAULTS["width"]])
def test_dcgan_width_sets_the_filters_of_both_networks(width):
    import keras

    cfg = {**gan.DEFAULTS, "seed": 0, "width": width}
    generator, discriminator = gan.build_generator(cfg), gan.build_discriminator(cfg)
    assert generator.output_shape == (None, 36, 36, 3)
    assert [layer.filters for layer in generator.layers if isinstance(layer, keras.layers.Conv2DTranspose)] == [
        width // 2, width // 4]
    assert [layer.filters for layer in discriminator.layers if isinstance(layer, keras.layers.Conv2D)] == [
        width // 4, width // 2, width]
    course = gan.build_discriminator({**cfg, "model": "course"})
    assert discriminator.count_params() < course.count_params() / 4  # no dense 256 layer


def test_diff_augment_is_differentiable_and_changes_each_image_differently():
    import keras
    import tensorflow as tf

    x = tf.constant(face_pixels(4, seed=0))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = gan.diff_augment(x, keras.random.SeedGenerator(1), shift=4)
        total = tf.reduce_sum(y)
    grad = tape.gradient(total, x)
    assert y.shape == x.shape and grad is not None and np.isfinite(grad.numpy()).all()
    change = (y - x).numpy().reshape(4, -1).mean(1)
    assert len(np.unique(np.round(change, 4))) == 4


def test_diff_augment_without_color_only_moves_pixels():
    """`augment_color` false (the default): every pixel the discriminator sees is a real pixel
    shifted, or the zero padding; colours are never changed."""
    import keras
    import tensorflow as tf

    x = face_pixels(6, seed=2)
    y = gan.diff_augment(tf.constant(x), keras.random.SeedGenerator(3), shift=4, color=False).numpy()
    for src, out in zip(x, y):
        assert np.isin(out, np.append(src, 0.0)).all()
    assert any(not np.array_equal(src, out) for src, out in zip(x, y))
    coloured = gan.diff_augment(tf.constant(x), keras.random.SeedGenerator(3), shift=4, color=True).numpy()
    assert not all(np.isin(out, np.append(src, 0.0)).all() for src, out in zip(x, coloured))


@pytest.mark.parametrize("model", ["dcgan", "course"])
def test_mixed_precision_networks_compute_in_bfloat16_and_hand_over_float32(model):
    """`precision` mixed_bfloat16 (what `auto` picks on a CPU with bfloat16 instructions): the
    layers compute in bfloat16, the faces and the logits come out float32 for the losses,
    DiffAugment and KID."""
    import keras

    from dlcli.engine import training

    cfg = {**gan.DEFAULTS, "seed": 0, "model": model, "width": 32, "code_size": 32}
    with training.precision("mixed_bfloat16"):
        generator, discriminator = gan.build_generator(cfg), gan.build_discriminator(cfg)
    faces_out = generator(np.zeros((2, 32), np.float32))
    dtype = keras.backend.standardize_dtype
    assert dtype(faces_out.dtype) == "float32" and dtype(discriminator(faces_out).dtype) == "float32"
    assert "bfloat16" in {layer.compute_dtype for layer in generator.layers + discriminator.layers}
    assert keras.config.dtype_policy().name == "float32"  # the global policy is put back


def test_recalibrated_batchnorm_normalises_with_the_fixed_codes_own_statistics():
    """After `recalibrate_batchnorm` the generator in inference mode draws from the fixed codes
    exactly what a training-mode pass draws (each BatchNorm holds that batch's mean and
    variance), the layers keep their momentum, and a second call changes nothing."""
    import keras

    cfg = {**gan.DEFAULTS, "seed": 0, "width": 32, "code_size": 32, "precision": "float32"}
    generator = gan.build_generator(cfg)
    codes = gan.batchnorm_codes(32)
    before = np.asarray(generator(codes, training=False))
    gan.recalibrate_batchnorm(generator)
    after = np.asarray(generator(codes, training=False))
    stats = [np.array(v) for v in generator.non_trainable_variables]
    gan.recalibrate_batchnorm(generator)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(stats, generator.non_trainable_variables))
    np.testing.assert_allclose(after, np.asarray(generator(codes, training=True)), atol=1e-5)
    assert np.abs(after - before).max() > 1e-3  # the initial statistics (0 and 1) did not fit
    norms = [layer for layer in generator.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 3 and all(layer.momentum == 0.99 for layer in norms)


def test_train_writes_history_with_kid_and_progress(trained_cli):
    cli, straight, _ = trained_cli
    run_dir = cli.root / "gan" / "straight"
    for name in ("generator.keras", "discriminator.keras", "split.json", "kid_features.npz", "metrics.json"):
        assert (run_dir / name).exists(), name
    with open(run_dir / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = {"kid", "kid_err", "fid", "kid_real", "kid_noise", "fid_real", "fid_noise", "d_loss", "d_real", "d_fake"}
    assert len(rows) == 2 and columns <= set(rows[0])
    assert float(rows[0]["kid_real"]) < float(rows[0]["kid_noise"])  # the references are ordered
    assert float(rows[0]["fid_real"]) < float(rows[0]["fid_noise"])
    assert np.load(run_dir / "progress.npy").shape == (2, gan.PROGRESS_ROW, 36, 36, 3)
    steps = 36 // 16  # 36 training faces, whole batches of 16
    assert straight["metrics"]["iterations"] == 2 * steps
    metrics = cli.json("eval", "gan", "--run", "straight")["metrics"]
    assert metrics["kid"] == pytest.approx(straight["metrics"]["kid"], rel=1e-3, abs=1e-6)
    assert metrics["fid"] == pytest.approx(straight["metrics"]["fid"], rel=1e-3)
    assert metrics["held_out_faces"] == 12


def test_eval_on_other_data_compares_every_face(trained_cli, tmp_path):
    """On another folder every face takes part, not the 25 % the run's seed holds out."""
    cli = trained_cli[0]
    other = make_faces(tmp_path / "other", 30, seed=9)
    result = cli("eval", "gan", "--run", "straight", "--dataset", f"folder:{other}", "--json")
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["faces"] == 30 and "held_out_faces" not in metrics
    assert np.isfinite(metrics["kid"]) and metrics["kid_real"] < metrics["kid_noise"]
    assert "all 30 faces" in result.stderr


def test_resume_restores_both_optimizers(trained_cli):
    cli, straight, resumed = trained_cli
    assert resumed["metrics"] == straight["metrics"]  # same losses and KID to the last digit
    runs = cli.root / "gan"
    assert (runs / "resumed" / "history.csv").read_text() == (runs / "straight" / "history.csv").read_text()
    cfg = {**gan.DEFAULTS, "code_size": 32, "seed": 42}
    a = gan.new_gan(cfg, runs / "straight" / "backup" / "epoch-0002")
    b = gan.new_gan(cfg, runs / "resumed" / "backup" / "epoch-0002")
    steps = 36 // 16
    for opt_a, opt_b, iterations in ((a.g_optimizer, b.g_optimizer, 2 * steps),
                                     (a.d_optimizer, b.d_optimizer, 2 * steps * cfg["d_steps"])):
        assert int(opt_a.iterations.numpy()) == int(opt_b.iterations.numpy()) == iterations
        assert len(opt_a.variables) > 1
        for va, vb in zip(opt_a.variables, opt_b.variables):
            np.testing.assert_array_equal(va.numpy(), vb.numpy())
    # and the state really comes from the file: a fresh GAN has zero iterations and zero moments
    fresh = gan.new_gan(cfg)
    assert int(fresh.d_optimizer.iterations.numpy()) == 0
    moments = [v for v in a.d_optimizer.variables if v.path.endswith(("_momentum", "_velocity"))]
    assert moments and all(np.abs(v.numpy()).sum() > 0 for v in moments)
    assert all(np.abs(v.numpy()).sum() == 0 for v in fresh.d_optimizer.variables if v.path.endswith("_momentum"))
    # The faces are drawn by the weight average (ema): it is not the live generator, it is what the
    # checkpoint's generator.keras holds, and it came back from the optimizer's state on resume.
    import keras

    backup = runs / "resumed" / "backup" / "epoch-0002"
    drawn = keras.models.load_model(backup / "generator.keras").get_weights()
    live = keras.models.load_model(backup / "generator_live.keras").get_weights()
    for saved, restored in zip(drawn, b.sampling_generator().get_weights()):
        np.testing.assert_array_equal(saved, restored)
    assert any(not np.array_equal(x, y) for x, y in zip(drawn, live))


def test_predict_same_seed_same_faces(trained_cli, tmp_path):
    cli = trained_cli[0]
    first = cli.json("predict", "gan", "--run", "straight", "--n", "6", "--seed", "1", "--out", tmp_path / "a")
    again = cli.json("predict", "gan", "--run", "straight", "--n", "6", "--seed", "1", "--out", tmp_path / "b")
    other = cli.json("predict", "gan", "--run", "straight", "--n", "6", "--seed", "2", "--out", tmp_path / "c")
    assert len(first) == 7 and first[-1]["path"].endswith("grid-1.png")  # 6 faces and one grid

    def pixels(rows):
        return np.stack([np.asarray(Image.open(r["path"])) for r in rows[:-1]])

    assert pixels(first).shape == (6, 36, 36, 3)
    assert (pixels(first) == pixels(again)).all()
    assert not (pixels(first) == pixels(other)).all()
    result = cli("predict", "gan", "--run", "straight", "face.jpg", expect=2)
    assert "takes no input files" in result.stderr


def test_views(trained_cli):
    cli = trained_cli[0]
    for view in ("gan-samples", "gan-progress", "gan-discriminator"):
        assert_drawn(cli.json("visualize", view, "--run", "straight")["path"])


@pytest.mark.slow
def test_kid_falls_on_real_faces(tmp_path):
    lfw = shared_data("lfw")
    cli = Cli(tmp_path / "runs")
    out = cli.json("train", "gan", "--dataset", f"folder:{lfw}", "--set", "limit=3000",
                   "--epochs", "3", "--quiet")
    with open(Path(out["run"]) / "history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    kid = [float(r["kid"]) for r in history]
    assert min(kid[1:]) < kid[0] and kid[-1] < float(history[-1]["kid_noise"])
    assert json.loads((Path(out["run"]) / "metrics.json").read_text())["kid"] == pytest.approx(kid[-1])


def _gan_command(faces_dir: Path, root: Path, run: str, *extra: str) -> list[str]:
    """A short gan run in its own process; no KID while training (`kid_every=0`): these tests
    look at the networks, and the KID network would double their time."""
    return [sys.executable, "-m", "dlcli", "train", "gan", "--dataset", f"folder:{faces_dir}", "--batch-size", "2",
            "--set", "val_fraction=0.25", "--set", "code_size=32", "--set", "width=32", "--set", "kid_every=0",
            "--epochs", "2", "--run", run, "--runs-dir", str(root), "--quiet", *extra]


def assert_same_weights(a: Path, b: Path) -> None:
    from dlcli.runs.checkpoints import load_model

    for wa, wb in zip(load_model(a, "gan").get_weights(), load_model(b, "gan").get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_kid_every_n_epochs_and_the_last(tmp_path, face_dir):
    cli = Cli(tmp_path / "runs")
    out = cli.json("train", "gan", "--dataset", f"folder:{face_dir}", *FAST, "--epochs", "3", "--set", "kid_every=2")
    with open(Path(out["run"]) / "history.csv", newline="") as fh:
        kid = [row["kid"] for row in csv.DictReader(fh)]
    assert kid[0] == "" and all(float(k) > 0 for k in kid[1:])  # epoch 2 (every 2nd) and 3 (the last)
    assert out["metrics"]["kid"] == pytest.approx(float(kid[-1])) and "kid_first_epoch" not in out["metrics"]
    assert_drawn(cli.json("visualize", "gan-progress", "--run", Path(out["run"]).name)["path"])


def test_sigterm_stops_the_gan_at_the_next_step_and_resume_continues_exactly(tmp_path):
    faces_dir = make_faces(tmp_path / "faces", 120, seed=3)  # 90 training faces, batch 2: 45 steps an epoch
    root = tmp_path / "runs"
    subprocess.run(_gan_command(faces_dir, root, "straight"), check=True, capture_output=True)
    proc = subprocess.Popen(_gan_command(faces_dir, root, "stopped", "--set", "save_every_steps=5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # process start, TensorFlow import and the KID network: slow on a loaded machine
    while not list((root / "gan" / "stopped" / "backup").glob("epoch-0000-step-*/state.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert re.search(r"stopped by SIGTERM (at epoch [12], step \d+|after epoch 1)", err) and "--run stopped --resume" in err
    resumed = subprocess.run(_gan_command(faces_dir, root, "stopped", "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    # Both networks, both optimizers and the noise generator came back: the same networks, the same history.
    runs = root / "gan"
    for name in ("generator.keras", "generator_live.keras", "discriminator.keras"):
        assert_same_weights(runs / "straight" / "backup" / "epoch-0002" / name, runs / "stopped" / "backup" / "epoch-0002" / name)
    stopped, straight = ((runs / run / "history.csv").read_text().splitlines() for run in ("stopped", "straight"))
    assert stopped[0] == straight[0] and "kid" not in stopped[0]  # kid_every=0
    # The stopped epoch's mean losses: its running sums came back, added in another order (float32).
    np.testing.assert_allclose(np.loadtxt(stopped[1:], delimiter=","), np.loadtxt(straight[1:], delimiter=","), rtol=1e-6)


def test_strategies_mirrored_and_two_workers(tmp_path, face_dir):
    """Two replicas, mirrored over two logical CPUs or as two worker processes, train like one."""
    root = tmp_path / "runs"
    one_epoch = ("--json", "--epochs", "1")
    subprocess.run(_gan_command(face_dir, root, "single", *one_epoch), check=True, capture_output=True)
    mirrored = subprocess.run([a for a in _gan_command(face_dir, root, "mirrored", "--set", "strategy=mirrored",
                                                       *one_epoch) if a != "--quiet"],
                              env={**os.environ, "DLCLI_CPU_REPLICAS": "2"}, capture_output=True, text=True)
    assert mirrored.returncode == 0, mirrored.stderr[-2000:]
    assert "strategy mirrored: 2 replicas in sync" in mirrored.stderr
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    procs = [subprocess.Popen(_gan_command(face_dir, root, "mw", "--set", "strategy=multi-worker", *one_epoch),
                              env={**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                                          "task": {"type": "worker", "index": i}})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    chief, other = (json.loads(out) for out, _ in outputs)
    assert chief["run"] == other["run"] == str(root / "gan" / "mw")
    assert chief["metrics"] == other["metrics"]  # one model, trained on both workers' shards
    assert chief["metrics"]["iterations"] == json.loads(mirrored.stdout)["metrics"]["iterations"]

    def losses(run):
        with open(root / "gan" / run / "history.csv", newline="") as fh:
            row = next(csv.DictReader(fh))
        return np.array([float(row["loss"]), float(row["d_loss"])])

    # Each replica's loss is divided by the number of replicas and the gradients summed: the
    # logged losses must still be whole-batch means, like a single device's (not halved).
    for run in ("mirrored", "mw"):
        np.testing.assert_allclose(losses(run), losses("single"), rtol=0.3)
