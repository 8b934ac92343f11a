"""Every task that runs several models, or samples, predicts from its export as from Keras.

For names, gan, autoencoder and caption: a tiny trained run is exported, then predicted with
`--engine keras`, `--engine lite` and the default (auto, which takes the current export):
the same names and captions at a fixed seed, arrays within 1e-4 and pixels within one grey
level; a fresh process predicting from the export imports no TensorFlow; a run whose model
changed after its export falls back to Keras and says so (auto) or refuses (lite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Cli, make_faces
from tests.test_caption import SMALL as CAPTION_SMALL, make_captions

NAMES = ["Anna", "Bob", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Kate", "Liam",
         "Mona", "Nora", "Oscar", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wanda", "Yara"]
FACES = ["--batch-size", "16", "--set", "val_fraction=0.25", "--epochs", "1", "--quiet"]
TRAIN = {
    "names": lambda data: ["--dataset", f"text:{data['text']}", "--epochs", "2", "--units", "16",
                           "--set", "samples=4", "--quiet"],
    "gan": lambda data: ["--dataset", f"folder:{data['faces']}", *FACES, "--set", "code_size=16", "--set", "width=16",
                         "--set", "kid_every=0", "--set", "precision=float32"],
    "autoencoder": lambda data: ["--dataset", f"folder:{data['faces']}", *FACES, "--set", "code=8"],
    "caption": lambda data: ["--dataset", f"captions:{data['captions']}", *CAPTION_SMALL, "--epochs", "2"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("data")
    (base / "names.txt").write_text("\n".join(NAMES) + "\n")
    return {"text": base / "names.txt", "faces": make_faces(base / "faces", 24, seed=2),
            "captions": make_captions(base / "captions", per_colour=4), "base": base}


def trained(task: str, data: dict, root: Path) -> tuple[Cli, Path]:
    cli = Cli(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLCLI_NETWORK_PROBE", "127.0.0.1:9")
        cli("train", task, *TRAIN[task](data), "--run", "tiny")
    return cli, root / task / "tiny"


def inputs_of(task: str, data: dict) -> list[str]:
    """Predict's inputs and options for each task, beside the seed."""
    faces = sorted(str(p) for p in Path(data["faces"]).rglob("*.jpg"))
    images = sorted(str(p) for p in (Path(data["captions"]) / "images").glob("*.jpg"))
    return {"names": ["--n", "25"], "gan": ["--n", "12"], "autoencoder": faces[:5],
            "caption": images[:6]}[task]


def same_rows(task: str, keras_rows: list[dict], lite_rows: list[dict]) -> None:
    assert len(keras_rows) == len(lite_rows) > 0
    for k, t in zip(keras_rows, lite_rows):
        assert k.keys() == t.keys()
        for key in k:
            if key == "path":
                a, b = np.asarray(Image.open(k[key]), np.int16), np.asarray(Image.open(t[key]), np.int16)
                assert a.shape == b.shape and np.abs(a - b).max() <= 1, (task, k[key])  # float32 rounding
            elif key == "mse":
                assert abs(k[key] - t[key]) <= 2e-6
            else:
                assert k[key] == t[key], (task, key)


def predicted(cli: Cli, task: str, args: list[str], engine: str | None, out: Path) -> list[dict]:
    extra = ["--engine", engine] if engine else []
    return cli.json("predict", task, *args, "--seed", "3", "--out", out, *extra)


def no_tensorflow_in_a_fresh_predict(root: Path, task: str, args: list[str], out: Path) -> list[dict]:
    code = ("import sys\nfrom dlcli.cli import main\n"
            f"sys.argv = ['dlcli', 'predict', {task!r}, *{args!r}, '--runs-dir', {str(root)!r}, '--seed', '3', "
            f"'--out', {str(out)!r}, '--json']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code\n"
            "print('TF', 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *rows, last = done.stdout.strip().splitlines()
    assert last == "TF False False", done.stdout[-500:]
    return json.loads("\n".join(rows))


@pytest.mark.parametrize("task", list(TRAIN))
def test_predict_from_the_export_equals_keras(task, data, tmp_path):
    cli, run_dir = trained(task, data, tmp_path / "runs")
    args = inputs_of(task, data)
    keras_rows = predicted(cli, task, args, "keras", tmp_path / "keras")
    result = cli("export", task)
    meta = json.loads((run_dir / "export" / "export.json").read_text())
    assert [str(run_dir / "export" / f["file"]) for f in meta["files"].values()] == result.stdout.split()
    lite_rows = predicted(cli, task, args, "lite", tmp_path / "lite")
    auto_rows = predicted(cli, task, args, None, tmp_path / "auto")
    same_rows(task, keras_rows, lite_rows)
    same_rows(task, keras_rows, auto_rows)
    if task in ("names", "caption"):  # sampling: one NumPy generator draws the same numbers on both engines
        more = {"names": ["--prefix", "A", "--temperature", "1.5", "--top-k", "5"],
                "caption": ["--temperature", "1.0"]}[task]
        same_rows(task, predicted(cli, task, args + more, "keras", tmp_path / "k2"),
                  predicted(cli, task, args + more, "lite", tmp_path / "l2"))
    if task == "caption":
        same_rows(task, predicted(cli, task, args + ["--beam", "3"], "keras", tmp_path / "k3"),
                  predicted(cli, task, args + ["--beam", "3"], "lite", tmp_path / "l3"))
    fresh = no_tensorflow_in_a_fresh_predict(cli.root, task, args, tmp_path / "fresh")
    same_rows(task, keras_rows, fresh)

    model_file = run_dir / ("generator.keras" if task == "gan" else "model.keras")
    later = os.stat(model_file).st_mtime_ns + 10**9
    os.utime(model_file, ns=(later, later))  # the run's model is newer than its export
    result = cli("predict", task, *args, "--seed", "3", "--out", tmp_path / "stale", "--json")
    assert "is stale" in result.stderr and "predicting with the Keras model" in result.stderr
    same_rows(task, keras_rows, json.loads(result.stdout))
    result = cli("predict", task, *args, "--engine", "lite", expect=2)
    assert "is stale" in result.stderr and "Traceback" not in result.stderr
    if len(meta["files"]) > 1:  # an export lacking a part the task runs: said, and Keras runs
        cli("export", task)
        (run_dir / "export" / meta["files"][list(meta["files"])[-1]]["file"]).unlink()
        result = cli("predict", task, *args, "--seed", "3", "--out", tmp_path / "part", "--json")
        assert f"lacks the part(s) {list(meta['files'])[-1]}" in result.stderr
        same_rows(task, keras_rows, json.loads(result.stdout))


def test_exported_parts_compute_what_the_keras_parts_do(data, tmp_path):
    """The autoencoder's encoder and decoder and the gan's generator, on raw arrays: within 1e-4."""
    import keras

    from dlcli.inference import lite

    for task, parts in (("autoencoder", ("encoder", "decoder")), ("gan", ("model",))):
        cli, run_dir = trained(task, data, tmp_path / task)
        cli("export", task)
        model = keras.models.load_model(run_dir / ("generator.keras" if task == "gan" else "model.keras"))
        meta = json.loads((run_dir / "export" / "export.json").read_text())
        for part in parts:
            keras_part = model if part == "model" else model.get_layer(part)
            x = np.random.default_rng(1).standard_normal((7, *keras_part.input_shape[1:])).astype(np.float32)
            got = lite.LiteModel(run_dir / "export" / meta["files"][part]["file"])(x)
            assert np.abs(got - keras_part.predict(x, verbose=0)).max() < 1e-4, (task, part)
