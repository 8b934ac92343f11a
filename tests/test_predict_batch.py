"""predict for batch jobs (directories, globs, stdin, --jsonl) and exported models.

Runs are made here from the task's own build function (no training: the tests are about
inputs, outputs and the exported model agreeing with the Keras one, not accuracy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlcli import config as config_lib
from dlcli.runs.run import Run
from dlcli.tasks import get_task

from .conftest import render_digit


def make_run(root: Path, task: str, name: str = "r", classes: list | None = None, **flags) -> Path:
    """A finished run of `task` with a freshly built (seeded, untrained) model."""
    import keras

    spec = get_task(task)
    cfg = config_lib.resolve(spec.defaults, flags=flags, choices=spec.choices)
    module = sys.modules[f"dlcli.tasks.{task}"]
    keras.utils.set_random_seed(0)
    model = module.build_model(cfg) if task == "autoencoder" else module.build_model(cfg, len(classes or range(10)))
    run = Run(task, root / task / name)
    run.dir.mkdir(parents=True)
    run.write_config(cfg)
    model.save(run.file("model.keras"))
    if classes is not None:
        run.file("classes.json").write_text(json.dumps(classes))
    run.write_metrics({})
    return run.dir


def digit_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"d{i:03d}.png"
        Image.fromarray(render_digit(i % 10, rng)).save(p)
        paths.append(p)
    return paths


def photo_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """RGB pictures of varied sizes: smooth colour fields with a few shapes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(yy * rng.uniform(1, 4) + xx * rng.uniform(0, 3)) % 256 for _ in range(3)], -1)
        img[rng.integers(0, h // 2):, rng.integers(0, w // 2):] = rng.integers(0, 255, 3)
        p = folder / f"p{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(img.astype(np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root, "mnist")
    return root


def rows_of(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# -- inputs ------------------------------------------------------------------------------


def test_directory_glob_stdin_and_files_mixed_in_order(mnist_run, tmp_path, cli):
    cli.root = mnist_run
    a = digit_files(tmp_path / "a", 3)
    b = digit_files(tmp_path / "b" / "deep" / "er", 2)
    (tmp_path / "b" / "notes.txt").write_text("not an image, and not an image type: skipped in a directory")
    c = digit_files(tmp_path / "c", 2)
    single = digit_files(tmp_path / "single", 1)[0]
    stdin = f"{c[1]}\n\n{c[0]}\n"
    result = cli.runner.invoke(__import__("dlcli.cli", fromlist=["app"]).app,
                               ["predict", "mnist", "--runs-dir", str(mnist_run), str(tmp_path / "b"),
                                str(tmp_path / "a" / "*.png"), "-", str(single), "--jsonl"], input=stdin)
    assert result.exit_code == 0, result.stderr
    rows = rows_of(result)
    assert [r["input"] for r in rows] == [str(p) for p in [*b, *a, c[1], c[0], single]]
    assert all(isinstance(r["digit"], int) and 0 <= r["probability"] <= 1 for r in rows)


def test_bad_inputs_each_one_line_and_every_good_input_predicted(mnist_run, tmp_path, cli):
    cli.root = mnist_run
    good = digit_files(tmp_path / "good", 12)
    (tmp_path / "good" / "d005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # unreadable, among good ones
    (tmp_path / "good" / "d008.png").unlink()
    (tmp_path / "good" / "d008.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link
    (tmp_path / "empty").mkdir()
    result = cli("predict", "mnist", tmp_path / "good", tmp_path / "empty", str(tmp_path / "none-*.png"),
                 "--jsonl", expect=2)
    rows = rows_of(result)
    assert len(rows) == 14 and sum("error" in r for r in rows) == 4
    assert [r["input"] for r in rows if "digit" in r] == [str(p) for i, p in enumerate(good) if i not in (5, 8)]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "Traceback" not in result.stderr
    assert any("d005.png" in e for e in errors) and any("d008.png" in e for e in errors)
    assert any("empty: a directory with no image files" in e for e in errors)
    assert any("none-*.png: the pattern matches no image files" in e for e in errors)
    assert "4 of 14 inputs failed" in result.stderr


def test_empty_stdin_is_one_line(mnist_run, cli):
    from dlcli.cli import app

    result = cli.runner.invoke(app, ["predict", "mnist", "--runs-dir", str(mnist_run), "-"], input="")
    assert result.exit_code == 2
    assert "standard input gave no paths" in result.stderr and "Traceback" not in result.stderr


def test_jsonl_streams_before_the_inputs_run_out(mnist_run, tmp_path):
    """The first batch's lines arrive while later paths are still unread on stdin."""
    files = digit_files(tmp_path / "d", 3)
    proc = subprocess.Popen([sys.executable, "-m", "dlcli", "predict", "mnist", "--runs-dir", str(mnist_run),
                             "--engine", "keras", "-", "--jsonl"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("".join(f"{p}\n" for p in files[:2] * 128))  # one full batch of 256
    proc.stdin.flush()
    first = proc.stdout.readline()  # answers although stdin is still open
    proc.stdin.write(f"{files[2]}\n")
    proc.stdin.close()
    rest = proc.stdout.read().splitlines()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert json.loads(first)["input"] == str(files[0])
    assert len(rest) == 256 and json.loads(rest[-1])["input"] == str(files[2])


# -- export -----------------------------------------------------------------------------


CASES = {
    "mnist": dict(make={}, files=digit_files),
    "cnn": dict(make={"precision": "float32", "width": 8}, files=photo_files),
    "finetune": dict(make={"weights": "none", "image_size": 32}, files=photo_files),
}


@pytest.mark.parametrize("task", list(CASES))
def test_exported_tflite_predicts_like_keras(task, tmp_path, cli):
    """Top-1 identical and probabilities within 1e-4, through the CLI and on the raw batch."""
    from dlcli.inference import lite

    case = CASES[task]
    classes = [f"c{i}" for i in range(5)] if task != "mnist" else None
    run_dir = make_run(cli.root, task, classes=classes, **case["make"])
    files = case["files"](tmp_path / "in", 10)
    keras_rows = cli.json("predict", task, tmp_path / "in", "--engine", "keras", "--top-k", "3")
    out = cli.json("export", task, "--runs-dir", cli.root, "--format", "tflite")
    assert out["task"] == task and (run_dir / "export" / "model.tflite").exists()
    assert json.loads((run_dir / "export" / "classes.json").read_text()) == (classes or [str(d) for d in range(10)])
    assert out["preprocessing"]["shape"]
    lite_rows = cli.json("predict", task, tmp_path / "in", "--engine", "lite", "--top-k", "3")
    assert [r["input"] for r in lite_rows] == [str(p) for p in sorted(files)]
    key = "digit" if task == "mnist" else "class"
    for k, t in zip(keras_rows, lite_rows):
        assert t[key] == k[key]
        for a, b in zip(k.get("top", [k]), t.get("top", [t])):
            assert a[key] == b[key] and abs(a["probability"] - b["probability"]) <= 1.01e-4  # both rounded to 4
    # the raw probabilities, before rounding
    import keras

    model = keras.models.load_model(run_dir / "model.keras")
    x = np.random.default_rng(1).uniform(-0.5, 1, (6, *model.input_shape[1:])).astype(np.float32)
    expected = model.predict(x, verbose=0)
    got = lite.LiteModel(run_dir / "export" / "model.tflite")(x)
    assert np.abs(got - expected).max() < 1e-4 and (got.argmax(1) == expected.argmax(1)).all()


def test_a_fresh_predict_with_an_export_never_imports_tensorflow(mnist_run, tmp_path, cli):
    cli.root = mnist_run
    cli("export", "mnist", "--runs-dir", mnist_run)
    digit = digit_files(tmp_path, 1)[0]
    code = ("import sys\nfrom dlcli.cli import main\nsys.argv = ['dlcli', 'predict', 'mnist', '--checkpoint-dir', "
            f"{str(mnist_run)!r}, {str(digit)!r}, '--json']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code\n"
            "print('TF', 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("TF False False") and '"digit"' in out.stdout


def test_stale_or_foreign_exports_are_refused(tmp_path, cli):
    run_dir = make_run(cli.root, "mnist")
    digit = digit_files(tmp_path, 1)[0]
    cli("export", "mnist", "--runs-dir", cli.root)
    later = os.stat(run_dir / "model.keras").st_mtime_ns + 10**9
    os.utime(run_dir / "model.keras", ns=(later, later))  # the run's model is newer than its export
    result = cli("predict", "mnist", digit, "--json")  # auto: falls back to Keras, says so
    assert "is stale" in result.stderr and "predicting with the Keras model" in result.stderr
    assert json.loads(result.stdout)[0]["input"] == str(digit)
    result = cli("predict", "mnist", digit, "--engine", "lite", expect=2)
    assert "is stale" in result.stderr and "Traceback" not in result.stderr
    result = cli("predict", "mnist", digit, "--checkpoint", run_dir / "export" / "model.tflite", expect=2)
    assert "is stale" in result.stderr
    # an export of another task: in the run's export/ folder, and named with --checkpoint
    cli("export", "mnist", "--runs-dir", cli.root)
    meta = json.loads((run_dir / "export" / "export.json").read_text())
    (run_dir / "export" / "export.json").write_text(json.dumps({**meta, "task": "cnn"}))
    result = cli("predict", "mnist", digit)
    assert "export of task 'cnn', not mnist" in result.stderr
    result = cli("predict", "cnn", digit, "--checkpoint", run_dir / "export" / "model.tflite", expect=2)
    assert "not a cnn model" in result.stderr or "not cnn" in result.stderr


def test_savedmodel_and_the_autoencoders_encoder_and_decoder(tmp_path, cli):
    import keras
    import tensorflow as tf

    from dlcli.inference import lite

    run_dir = make_run(cli.root, "mnist")
    out = cli.json("export", "mnist", "--runs-dir", cli.root, "--format", "savedmodel", "--out", tmp_path / "sm")
    assert out["format"] == "savedmodel" and (tmp_path / "sm" / "classes.json").exists()
    x = np.random.default_rng(2).uniform(0, 1, (4, 28, 28)).astype(np.float32)
    loaded = tf.saved_model.load(str(tmp_path / "sm" / "saved_model"))  # kept: it owns the variables
    served = loaded.serve(x).numpy()
    expected = keras.models.load_model(run_dir / "model.keras").predict(x, verbose=0)
    assert np.abs(served - expected).max() < 1e-5

    ae = make_run(cli.root, "autoencoder", model="deep", code=8)
    cli("export", "autoencoder", "--runs-dir", cli.root)
    meta = json.loads((ae / "export" / "export.json").read_text())
    assert meta["output"].startswith("encoder: the code") and meta["preprocessing"]["offset"] == -0.5
    assert list(meta["files"]) == ["encoder", "decoder"] and meta["files"]["decoder"]["input_shapes"] == [[None, 8]]
    encoder = keras.models.load_model(ae / "model.keras").get_layer("encoder")
    faces = np.random.default_rng(3).uniform(-0.5, 0.5, (3, *encoder.input_shape[1:])).astype(np.float32)
    codes = lite.LiteModel(ae / "export" / "encoder.tflite")(faces)
    assert np.abs(codes - encoder.predict(faces, verbose=0)).max() < 1e-4
    decoder = keras.models.load_model(ae / "model.keras").get_layer("decoder")
    decoded = lite.LiteModel(ae / "export" / "decoder.tflite")(codes)
    assert np.abs(decoded - decoder.predict(codes, verbose=0)).max() < 1e-4

    result = cli("export", "linear", "--runs-dir", cli.root, expect=2)
    assert "cannot be exported" in result.stderr


def test_auto_leaves_the_float32_export_of_a_mixed_precision_model_alone(tmp_path, cli):
    """A bfloat16 model's export does not reproduce its probabilities to 1e-4: auto uses Keras."""
    from types import SimpleNamespace

    from dlcli.inference import lite

    run_dir = make_run(cli.root, "mnist")
    cli("export", "mnist", "--runs-dir", cli.root)
    meta_path = run_dir / "export" / "export.json"
    meta = json.loads(meta_path.read_text())
    assert meta["keras_precision"] == "float32"
    run = Run("mnist", run_dir)
    ctx = lambda engine: SimpleNamespace(options={"engine": engine}, checkpoint=None, run=run, reporter=None)  # noqa: E731
    assert isinstance(lite.model_for(ctx("auto"), "mnist", lambda: "keras model"), lite.LiteModel)
    meta_path.write_text(json.dumps({**meta, "keras_precision": "mixed_bfloat16"}))
    assert isinstance(lite.model_for(ctx("auto"), "mnist", lambda: "keras model"), lite.KerasModel)
    assert isinstance(lite.model_for(ctx("lite"), "mnist", lambda: "keras model"), lite.LiteModel)


def test_keras_model_pads_a_short_last_batch_and_traces_once():
    """A stream's short last batch is padded to the full batch, so Keras does not trace its
    predict step a second time, and its rows are what the model gives those images alone."""
    import keras

    from dlcli.inference.lite import KerasModel

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    x = np.random.default_rng(0).standard_normal((13, 4)).astype("float32")
    run = KerasModel(model)
    full, short = run(x[:8]), run(x[8:])
    assert short.shape == (5, 3)
    np.testing.assert_allclose(np.concatenate([full, short]), model(x).numpy(), atol=1e-6)
    assert model.predict_function.experimental_get_tracing_count() == 1


# -- reading and preparing inputs ---------------------------------------------------------


def _pillow_read(path, mode):
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        return np.asarray(img if img.mode == mode else img.convert(mode))


def test_plain_pngs_read_by_the_short_path_give_pillows_pixels(tmp_path):
    """Each PNG kind, the short path's and the ones it leaves to Pillow, read as Pillow reads it."""
    from dlcli.data.images import _plain_png, read_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    pixels[:, :, :3] = np.where(rng.random((23, 31, 1)) < 0.5, pixels[:, :, :3], 40)  # runs, so every filter type occurs
    kinds = {"L": pixels[:, :, 0], "RGB": pixels[:, :, :3], "LA": pixels[:, :, :2], "RGBA": pixels}
    saved = {}
    for mode, array in kinds.items():
        saved[mode] = tmp_path / f"{mode}.png"
        Image.fromarray(array, mode).save(saved[mode])
    Image.fromarray(pixels[:, :, :3]).quantize(16).save(tmp_path / "P.png")  # palette: Pillow's path
    Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    Image.fromarray(pixels[:, :, :3]).save(tmp_path / "trns.png", transparency=(40, 40, 40))
    for mode in kinds:
        assert _plain_png(saved[mode].read_bytes()) is not None, mode  # taken by the short path
    for name in ("P", "trns"):
        assert _plain_png((tmp_path / f"{name}.png").read_bytes()) is None, name
    header = bytearray(saved["L"].read_bytes())
    header[28] = 1  # interlaced (Adam7), which Pillow does not write: the short path refuses it
    header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")
    assert _plain_png(bytes(header)) is None
    for path in sorted(tmp_path.glob("*.png")):
        for mode in ("L", "RGB"):
            if path.stem == "16bit" and mode == "RGB":
                continue  # Pillow itself cannot convert I;16 to RGB
            assert np.array_equal(read_image(path, mode=mode), _pillow_read(path, mode)), (path.name, mode)


def test_broken_pngs_get_pillows_error(tmp_path):
    """A bad checksum or cut data: the short path steps aside and Pillow's answer (its error) stands."""
    from dlcli.errors import UsageError
    from dlcli.data.images import _plain_png, read_image

    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) * 7).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "crc.png").write_bytes(data[:29] + bytes([data[29] ^ 1]) + data[30:])  # IHDR's checksum
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "nocrc.png").write_bytes(data[: len(data) - 14])  # the pixel data's checksum cut
    assert _plain_png(data) is not None
    assert _plain_png((tmp_path / "nocrc.png").read_bytes()) is None  # Pillow reads it, and so do we
    assert np.array_equal(read_image(tmp_path / "nocrc.png", mode="L"), _pillow_read(tmp_path / "nocrc.png", "L"))
    for name, error in (("crc", "not an image"), ("cut", "cannot read image")):
        assert _plain_png((tmp_path / f"{name}.png").read_bytes()) is None
        with pytest.raises(UsageError, match=rf"{name}.png: {error}"):
            read_image(tmp_path / f"{name}.png", mode="L")


def test_quick_inputs_are_prepared_in_the_main_thread_slow_ones_in_threads():
    """Handing a 24 us decode to a thread costs more than it; a slow one runs ahead in threads.
    The first batch's median time decides (`threads_from`): here a threshold above any time
    stands for quick inputs, one below any time for slow ones, so no clock decides the test."""
    import threading

    from dlcli.inference.inputs import stream

    def run(threads_from):
        where = {}

        def prepare(path):
            where[path] = threading.current_thread() is threading.main_thread()
            return path

        rows = list(stream([f"f{i}" for i in range(40)], prepare, lambda paths, xs: [{"input": p} for p in paths], 8,
                           threads_from=threads_from))
        assert [r["input"] for r in rows] == [f"f{i}" for i in range(40)]
        return where

    quick = run(float("inf"))
    assert all(quick.values())
    slow = run(-1.0)
    assert all(slow[f"f{i}"] for i in range(8))  # the first batch tells how long one takes
    assert not any(slow[f"f{i}"] for i in range(8, 40))  # those queued meanwhile go to the threads too


def test_only_paths_on_stdin_get_a_feeder_thread(tmp_path):
    """Files, folders and globs are read in the main thread as batches are taken (a thread
    reading ahead only slowed 1,000 small files by its system calls); stdin may wait for input."""
    import io

    from dlcli.inference.inputs import expand

    files = [str(p) for p in digit_files(tmp_path / "d", 3)]
    assert not expand([files[0], str(tmp_path / "d"), str(tmp_path / "d" / "*.png")]).live
    stdin = expand([files[0], "-"], stdin=io.StringIO(f"{files[1]}\n{files[2]}\n"))
    assert stdin.live and list(stdin) == files
