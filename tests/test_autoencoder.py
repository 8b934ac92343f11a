"""Task autoencoder on tiny generated faces: data, models, train/eval, predict modes, views.

The real-data test (`-m slow`) reads DLCLI_SHARED_DATA (the folder holding `lfw/`).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlcli.data import faces
from dlcli.errors import UsageError
from dlcli.tasks import autoencoder
from tests.conftest import Cli, assert_drawn, draw_face, make_faces, shared_data

FAST = ["--epochs", "2", "--batch-size", "16", "--set", "val_fraction=0.25", "--quiet"]


@pytest.fixture(scope="module")
def face_dir(tmp_path_factory) -> Path:
    return make_faces(tmp_path_factory.mktemp("faces"), 48)


@pytest.fixture(scope="module")
def trained_cli(tmp_path_factory, face_dir):
    """One tiny trained run shared by the module's tests (training is the slow part)."""
    cli = Cli(tmp_path_factory.mktemp("runs"))
    metrics = cli.json("train", "autoencoder", "--dataset", f"folder:{face_dir}", "--run", "tiny", *FAST)
    return cli, metrics


@pytest.fixture
def trained(trained_cli, monkeypatch):
    monkeypatch.setenv("DLCLI_NETWORK_PROBE", "127.0.0.1:9")
    return trained_cli[1]


@pytest.fixture
def cli(trained_cli):
    return trained_cli[0]


# -- data -----------------------------------------------------------------------------------


def test_preprocess_takes_the_central_crop_then_resizes():
    img = np.zeros((128, 128, 3), np.uint8)
    img[19:109, 19:109] = 200  # the central 90x90, the course's crop
    out = faces.preprocess(img, crop=90, size=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.min() >= 190  # nothing of the border survives the crop
    whole = faces.preprocess(img, crop=0, size=32)
    assert whole[0, 0, 0] < 10 and whole[16, 16, 0] > 190
    small = faces.preprocess(np.full((40, 60, 3), 7, np.uint8), crop=90, size=32)  # smaller than the crop
    assert small.shape == (32, 32, 3)


def test_split_is_seeded_disjoint_and_saved(face_dir, tmp_path):
    ids = [f"f{i}" for i in range(100)]
    train_a, val_a = faces.split_ids(ids, 0.1, seed=3)
    train_b, val_b = faces.split_ids(ids, 0.1, seed=3)
    assert (val_a == val_b).all() and len(val_a) == 10 and not set(train_a) & set(val_a)
    assert not (faces.split_ids(ids, 0.1, seed=4)[1] == val_a).all()

    class FakeRun:
        file = staticmethod(lambda name: tmp_path / name)

    cfg = {**autoencoder.DEFAULTS, "dataset": f"folder:{face_dir}"}
    first = faces.load_split(cfg, FakeRun)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["val"] == first["val_ids"] and len(saved["train"]) + len(saved["val"]) == 48
    again = faces.load_split({**cfg, "seed": 99}, FakeRun)  # a different seed, but the run's split wins
    assert again["val_ids"] == first["val_ids"] and (again["x_val"] == first["x_val"]).all()


def make_people(folder: Path, counts: list[int], seed: int = 0) -> Path:
    """Face JPEGs of len(counts) people, counts[k] photos in folder/Person_k/, LFW's layout."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(counts):
        person = folder / f"Person_{k}"
        person.mkdir(parents=True)
        for i in range(n):
            draw_face(rng, 48).save(person / f"Person_{k}_{i:04d}.jpg")
    return folder


class Heard:
    """A reporter that keeps its info lines."""

    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)


def fake_run(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    return type("FakeRun", (), {"file": staticmethod(lambda name: folder / name)})


def person(face_id: str) -> str:
    return Path(face_id).parent.name


def test_person_split_puts_no_person_on_both_sides_and_is_seeded():
    people = [f"p{k}" for k, n in enumerate([1, 5, 2, 9, 3, 1, 4, 6, 2, 7] * 5) for _ in range(n)]
    train, val = faces.split_people(people, 0.1, seed=3)
    assert len(train) + len(val) == len(people) and not set(train) & set(val)
    assert not {people[i] for i in train} & {people[i] for i in val}
    assert len(val) == round(0.1 * len(people))  # people are held out while they fit the share
    again = faces.split_people(people, 0.1, seed=3)
    assert (again[1] == val).all()
    assert not np.array_equal(faces.split_people(people, 0.1, seed=4)[1], val)
    big = ["a"] * 30 + ["b"] * 30  # no person fits in a tenth: the first one drawn is held out
    assert len(faces.split_people(big, 0.1, seed=0)[1]) == 30
    with pytest.raises(UsageError, match="one person"):
        faces.split_people(["a"] * 5, 0.2, seed=0)


def test_the_default_split_holds_out_whole_people_saved_and_reused(tmp_path):
    data = make_people(tmp_path / "lfw", [6, 1, 3, 2, 8, 1, 4, 5, 2, 3])
    cfg = {**autoencoder.DEFAULTS, "dataset": f"folder:{data}", "val_fraction": 0.2}
    run, heard = fake_run(tmp_path / "run"), Heard()
    first = faces.load_split(cfg, run, heard)
    held, trained = {person(i) for i in first["val_ids"]}, {person(i) for i in first["train_ids"]}
    assert held and trained and not held & trained
    assert len(first["val_ids"]) == 7 and len(first["train_ids"]) == 28
    saved = json.loads(run.file("split.json").read_text())
    assert saved["split"] == "person" and saved["val"] == first["val_ids"]
    assert heard.lines == [f"holding out 7 faces of {len(held)} people (split: person; none of them in training)"]
    again = faces.load_split({**cfg, "seed": 7, "split": "photo"}, run)  # the run's saved split wins
    assert again["val_ids"] == first["val_ids"] and (again["x_val"] == first["x_val"]).all()
    other = faces.load_split({**cfg, "seed": 7}, fake_run(tmp_path / "run7"))
    assert other["val_ids"] != first["val_ids"]


def test_split_photo_holds_out_photos_of_people_also_trained_on(tmp_path):
    data = make_people(tmp_path / "lfw", [10, 10, 10, 10])
    cfg = {**autoencoder.DEFAULTS, "dataset": f"folder:{data}", "val_fraction": 0.25, "split": "photo"}
    split = faces.load_split(cfg, fake_run(tmp_path / "run"))
    assert {person(i) for i in split["val_ids"]} & {person(i) for i in split["train_ids"]}
    assert json.loads((tmp_path / "run" / "split.json").read_text())["split"] == "photo"


def test_photos_with_no_person_fall_back_to_the_photo_split_and_say_so(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        draw_face(rng, 48).save(flat / f"face_{i}.jpg")
    make_people(flat, [3])  # three photos of one person beside the seven loose ones
    cfg = {**autoencoder.DEFAULTS, "dataset": f"folder:{flat}", "val_fraction": 0.2}
    assert faces.load_faces_and_people(cfg)[2] is None
    heard = Heard()
    split = faces.load_split(cfg, fake_run(tmp_path / "run"), heard)
    assert len(split["val_ids"]) == 3 and len(heard.lines) == 1
    assert "by photo, not by person" in heard.lines[0] and "names no person" in heard.lines[0]
    assert json.loads((tmp_path / "run" / "split.json").read_text())["split"] == "photo"
    one = make_people(tmp_path / "one", [8])
    heard = Heard()
    split = faces.load_split({**cfg, "dataset": f"folder:{one}"}, fake_run(tmp_path / "run1"), heard)
    assert len(split["val_ids"]) == 2 and "one person" in heard.lines[0]


def test_tfds_people_are_its_text_labels(monkeypatch):
    from dlcli.data import sources

    class Builder:
        def __init__(self, labels):
            self.labels = labels
            self.info = type("Info", (), {"splits": {"train": None}})

        def as_dataset(self, split):
            rows = [{"image": np.full((50, 50, 3), 9 * i, np.uint8), "label": label} for i, label in enumerate(self.labels)]
            return type("Ds", (), {"as_numpy_iterator": lambda _self: iter(rows)})()

    cfg = {**autoencoder.DEFAULTS, "dataset": "lfw"}
    monkeypatch.setattr(sources, "tfds_builder", lambda name, data_dir: Builder([b"Ann_A", b"Bob_B", b"Ann_A"]))
    ids, x, people = faces.load_faces_and_people(cfg)
    assert ids == ["lfw:0", "lfw:1", "lfw:2"] and people == ["Ann_A", "Bob_B", "Ann_A"] and x.shape == (3, 32, 32, 3)
    monkeypatch.setattr(sources, "tfds_builder", lambda name, data_dir: Builder([np.int64(0), np.int64(1)]))
    assert faces.load_faces_and_people(cfg)[2] is None  # a number is a class, not a person


def test_dataset_errors_are_usage_errors(tmp_path):
    cfg = {**autoencoder.DEFAULTS}
    with pytest.raises(UsageError, match="does not exist"):
        faces.load_faces({**cfg, "dataset": f"folder:{tmp_path / 'missing'}"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        faces.load_faces({**cfg, "dataset": f"folder:{tmp_path / 'empty'}"})


# -- models ---------------------------------------------------------------------------------


def test_models_have_a_code_of_the_configured_size():
    cfg = dict(autoencoder.DEFAULTS)
    pca = autoencoder.build_model({**cfg, "model": "pca"})
    assert pca.name == "autoencoder_pca" and pca.output_shape == (None, 32, 32, 3)
    assert pca.count_params() == (3072 * 32 + 32) + (32 * 3072 + 3072)  # two linear maps, nothing else
    deep = autoencoder.build_model({**cfg, "model": "deep", "code": 16, "noise": 0.1})
    encoder, decoder = autoencoder.parts(deep)
    assert encoder.output_shape == (None, 16) and decoder.output_shape == (None, 32, 32, 3)
    assert deep.get_layer("noise").stddev == 0.1  # the denoising mode
    with pytest.raises(UsageError, match="divide by 16"):
        autoencoder.build_model({**cfg, "image_size": 36})


def test_the_rate_falls_along_a_half_cosine_by_default_and_by_lr_decay_when_asked():
    cfg = {**autoencoder.DEFAULTS}
    rates = [autoencoder.schedule(cfg).schedule(epoch) for epoch in range(cfg["epochs"])]
    assert rates[0] == pytest.approx(cfg["lr"]) and all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[cfg["epochs"] // 2] == pytest.approx(cfg["lr"] / 2)
    assert 0 < rates[-1] < cfg["lr"] / 100
    cfg["lr_schedule"] = "exponential"
    rates = [autoencoder.schedule(cfg).schedule(epoch) for epoch in range(3)]
    assert rates == pytest.approx([cfg["lr"] * cfg["lr_decay"] ** e for e in range(3)])


def test_morph_and_nearest():
    a, b = np.zeros(4, np.float32), np.ones(4, np.float32)
    line = autoencoder.morph_codes(a, b, 5)
    assert line.shape == (5, 4) and (line[0] == a).all() and (line[-1] == b).all()
    assert np.allclose(line[2], 0.5)
    found, dist = autoencoder.nearest(np.array([[0, 0], [3, 4], [1, 0]], np.float32), np.array([0, 0], np.float32), 2)
    assert found.tolist() == [0, 2] and dist.tolist() == [0.0, 1.0]


# -- end to end -----------------------------------------------------------------------------


def test_train_eval_and_the_run_files(trained, cli):
    run_dir = cli.root / "autoencoder" / "tiny"
    for name in ("config.yaml", "model.keras", "history.csv", "metrics.json", "split.json"):
        assert (run_dir / name).exists(), name
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + 2
    split = json.loads((run_dir / "split.json").read_text())
    assert split["split"] == "person" and len(split["val"]) == 12  # one of the four people, all 12 photos
    assert not {person(i) for i in split["val"]} & {person(i) for i in split["train"]}
    metrics = cli.json("eval", "autoencoder")["metrics"]
    assert metrics["val_faces"] == 12
    assert metrics["val_mse"] == pytest.approx(trained["metrics"]["val_mse"], rel=1e-4)


def test_eval_on_other_data_scores_every_face(trained, cli, tmp_path):
    """All of the other folder, not the share the run's seed would hold out of the other folder (5 of 20)."""
    other = make_faces(tmp_path / "other", 20, seed=7)
    result = cli("eval", "autoencoder", "--dataset", f"folder:{other}", "--json")
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["faces"] == 20 and "val_faces" not in metrics
    assert np.isfinite(metrics["mse"]) and metrics["mean_face_mse"] > 0
    assert "all 20 faces" in result.stderr


def test_eval_faces_on_other_data_ignore_the_runs_limit(face_dir, tmp_path):
    class FakeRun:
        file = staticmethod(lambda name: tmp_path / name)

    cfg = {**autoencoder.DEFAULTS, "dataset": f"folder:{face_dir}", "limit": 10}
    x, prefix = faces.eval_faces(cfg, FakeRun, other_data=True)
    assert len(x) == 48 and prefix == ""
    x, prefix = faces.eval_faces(cfg, FakeRun, other_data=False)
    assert len(x) == 1 and prefix == "val_"  # the run's own data: its held-out 10 % of 10


def test_predict_reconstruction_similar_and_morph(trained, cli, face_dir, tmp_path):
    a, b = sorted(face_dir.rglob("*.jpg"))[:2]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "out"
    result = cli("predict", "autoencoder", a, b, bad, "--out", out, "--json", expect=2)
    rows = json.loads(result.stdout)
    assert [r["input"] for r in rows] == [str(a), str(b), str(bad)]
    for row in rows[:2]:
        with Image.open(row["path"]) as img:
            assert img.size == (32 * autoencoder.PNG_SCALE,) * 2
    assert "not an image" in rows[2]["error"] and "1 of 3 inputs failed" in result.stderr

    rows = cli.json("predict", "autoencoder", a, "--similar", "3", "--index", face_dir, "--out", out)
    assert [n["image"] for n in rows[0]["similar"]][0] == str(a)  # a face is its own nearest neighbour
    assert rows[0]["similar"][0]["distance"] == 0 and len(rows[0]["similar"]) == 3
    cache = list((cli.root / "autoencoder" / "tiny" / "index").glob("*.npz"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    again = cli.json("predict", "autoencoder", b, "--similar", "2", "--index", face_dir, "--out", out)
    assert cache[0].stat().st_mtime_ns == stamp and len(again[0]["similar"]) == 2  # the cached index is reused

    rows = cli.json("predict", "autoencoder", "--morph", a, b, "--steps", "7", "--out", out)
    with Image.open(rows[0]["path"]) as strip:
        assert strip.size == ((7 * 32 + 6) * autoencoder.PNG_SCALE, 32 * autoencoder.PNG_SCALE)


def test_predict_bad_usage_is_one_line_exit_2(trained, cli, face_dir, tmp_path):
    a = next(face_dir.rglob("*.jpg"))
    result = cli("predict", "autoencoder", a, "--similar", "3", "--index", tmp_path / "nowhere", expect=2)
    assert "--index" in result.stderr and "no such folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = cli("predict", "autoencoder", a, "--similar", "3", expect=2)
    assert "needs --index" in result.stderr


def test_views(trained, cli):
    for view in ("autoencoder-reconstructions", "autoencoder-similar", "autoencoder-morph"):
        assert_drawn(cli.json("visualize", view)["path"])


@pytest.mark.slow
def test_both_models_learn_real_faces(tmp_path):
    """A short run on 3,000 real faces: each model must do far better than the mean face."""
    lfw = shared_data("lfw")
    cli = Cli(tmp_path / "runs")
    data = ["--dataset", f"folder:{lfw}", "--set", "limit=3000", "--epochs", "3", "--quiet"]
    for model in ("deep", "pca"):
        cli.json("train", "autoencoder", *data, "--model", model, "--run", model)
        metrics = cli.json("eval", "autoencoder", "--run", model)["metrics"]
        assert metrics["val_mse"] < 0.4 * metrics["mean_face_mse"], model
