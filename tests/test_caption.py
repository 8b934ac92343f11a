"""Task caption: corpus BLEU by hand, the vocabulary rules, and train / eval / predict / view
end to end on a tiny generated captions folder with a small random-init encoder."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlcli.tasks import caption
from tests.conftest import Cli, assert_drawn, shared_data

COLOURS = {"blue": (30, 40, 210), "green": (30, 190, 40), "red": (220, 30, 30)}
SMALL = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none",
         "--batch-size", "16", "--lr", "0.02", "--quiet"]


def photo(colour, rng) -> np.ndarray:
    return np.clip(rng.normal(COLOURS[colour], 30, (40, 50, 3)), 0, 255).astype(np.uint8)


def make_captions(root: Path, per_colour=10, seed=0) -> Path:
    """Images of one colour each, captioned with their colour in three wordings (Flickr8k layout)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = ["image,caption"]
    for colour in COLOURS:
        for i in range(per_colour):
            name = f"{colour}{i}.jpg"
            Image.fromarray(photo(colour, rng)).save(root / "images" / name)
            rows += [f'{name},"A {colour} picture, very {colour}."', f"{name},a {colour} picture very {colour}",
                     f'{name},"A {colour} picture, quite {colour}!"']
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root


# -- pure functions ------------------------------------------------------------------------


def test_corpus_bleu_on_a_hand_checked_case():
    # "a cat sat" vs "a cat sat down": p1 = p2 = p3 = 1, no 4-grams; c = 3, r = 4: BP = exp(1 - 4/3)
    short = caption.corpus_bleu([[["a", "cat", "sat", "down"]]], [["a", "cat", "sat"]])
    assert short[:3] == pytest.approx([math.exp(-1 / 3)] * 3) and short[3] == 0.0
    # clipping: "the" counts at most once (its count in the reference): p1 = 1/4, c = 4 > r = 2: BP = 1
    assert caption.corpus_bleu([[["the", "cat"]]], [["the"] * 4])[0] == pytest.approx(0.25)
    # the corpus sums counts before dividing: p1 = (3 + 1) / (3 + 4), p2 = (2 + 0) / (2 + 3), c = 7 > r = 6
    both = caption.corpus_bleu([[["a", "cat", "sat", "down"]], [["the", "cat"]]], [["a", "cat", "sat"], ["the"] * 4])
    assert both[0] == pytest.approx(4 / 7) and both[1] == pytest.approx(math.sqrt(4 / 7 * 2 / 5))
    # the closest reference length counts, and a perfect match scores 1
    assert caption.corpus_bleu([[["x"] * 9, list("abcde")]], [list("abcde")]) == pytest.approx([1.0] * 4)


def test_vocabulary_and_encoding_follow_the_course():
    texts = ["A dog, running!"] * 5 + ["a cat"] * 4
    vocab = caption.build_vocab(texts, min_count=5)
    assert vocab == ["#PAD#", "#UNK#", "#START#", "#END#", "a", "dog", "running"]
    tokens = caption.encode(["A cat runs", " ".join(["dog"] * 30)], vocab, max_tokens=20)
    assert tokens.shape == (2, 20)
    assert tokens[0, :5].tolist() == [2, 4, 1, 1, 3] and (tokens[0, 5:] == 0).all()
    assert tokens[1, 0] == 2 and tokens[1, 19] == 3 and (tokens[1, 1:19] == 5).all()  # cut at 20, #END# kept
    assert caption.decode_ids(tokens[0], vocab) == ["a", "#UNK#", "#UNK#"]


def test_baselines():
    items = [("x", ["A dog runs.", "a dog runs"]), ("y", ["A cat."])]
    assert caption.baseline_caption(items) == ["a", "dog", "runs"]
    vocab = caption.build_vocab(["a dog runs", "a dog runs", "a cat"], 1)
    train = caption.encode(["a dog runs", "a dog runs", "a cat"], vocab, 6)
    held = caption.encode(["a cat runs"], vocab, 6)  # a->dog (wrong), cat->#END# (wrong), runs->#END# (right)...
    # targets: a, cat, runs, #END#; guesses after #START#, a, cat, runs: a, dog, #END#, #END#
    assert caption.bigram_accuracy(train, held) == pytest.approx(2 / 4)


def test_views_are_the_centre_its_mirror_and_random_crops_fixed_by_the_image_id():
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    views = caption.views_of(image, "a.jpg", 24, 6)
    assert len(views) == 6 and all(v.shape == (24, 24, 3) and v.dtype == np.uint8 for v in views)
    centre = caption.backbones.crop_resize(image, 24).numpy()
    np.testing.assert_array_equal(views[0], centre)
    np.testing.assert_array_equal(views[1], centre[:, ::-1])
    np.testing.assert_array_equal(views[3], views[2][:, ::-1])
    assert not np.array_equal(views[2], centre) and not np.array_equal(views[4], views[2])
    again, other = caption.views_of(image, "a.jpg", 24, 6), caption.views_of(image, "b.jpg", 24, 6)
    assert all(np.array_equal(a, b) for a, b in zip(views, again))  # the cache stays valid
    assert not np.array_equal(other[2], views[2])
    assert len(caption.views_of(image, "a.jpg", 24, 1)) == 1


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("caption")
    folder = make_captions(base / "colours")
    cli = Cli(base / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLCLI_NETWORK_PROBE", "127.0.0.1:9")
        out = cli.json("train", "caption", "--dataset", f"captions:{folder}", "--run", "tiny", *SMALL, "--epochs", "15")
    return {"cli": cli, "folder": folder, "out": out, "dir": base / "runs" / "caption" / "tiny"}


def test_train_saves_vocabulary_and_caches_embeddings(trained, monkeypatch):
    run = trained["dir"]
    vocab = json.loads((run / "vocab.json").read_text())
    assert vocab[:4] == caption.SPECIALS and {"red", "green", "blue", "picture"} <= set(vocab)
    assert "quite" in vocab  # 10 uses >= 5
    metrics = trained["out"]["metrics"]
    assert metrics["train_images"] + metrics["heldout_images"] == 30 and metrics["heldout_images"] == 6
    cached = sorted((run.parent / ".embeddings").glob("*.npz"))
    assert len(cached) == 2  # the training images' views, the held-out images' centres
    shapes = sorted(np.load(path)["embeddings"].shape for path in cached)
    assert shapes == [(1, 6, 1280), (6, 24, 1280)]
    # a second run reads the cache: building the encoder again would fail here
    monkeypatch.setattr(caption, "build_encoder", lambda spec: pytest.fail("the encoder was rebuilt"))
    trained["cli"]("train", "caption", "--dataset", f"captions:{trained['folder']}", "--run", "again", *SMALL,
                   "--epochs", "1")
    assert sorted((run.parent / ".embeddings").glob("*.npz")) == cached


def test_eval_beats_the_trivial_baseline(trained):
    metrics = trained["cli"].json("eval", "caption", "--run", "tiny")["metrics"]
    assert metrics["heldout_images"] == 6
    assert metrics["greedy_bleu_4"] > metrics["baseline_bleu_4"] + 0.2
    assert metrics["beam3_bleu_4"] > metrics["baseline_bleu_4"] + 0.2
    assert metrics["next_word_accuracy"] > metrics["baseline_next_word_accuracy"]


def test_eval_on_another_folder_scores_every_image_with_the_runs_baselines(trained, tmp_path):
    other = make_captions(tmp_path / "other", per_colour=4, seed=3)
    own = trained["cli"].json("eval", "caption", "--run", "tiny")["metrics"]
    metrics = trained["cli"].json("eval", "caption", "--run", "tiny", "--dataset", f"captions:{other}")["metrics"]
    assert metrics["heldout_images"] == 12  # all of them, not the 20 % the seed would hold out
    assert metrics["baseline_caption"] == own["baseline_caption"]  # fitted on the run's training captions
    assert metrics["greedy_bleu_4"] > metrics["baseline_bleu_4"] + 0.2


def test_predict_many_images_with_each_decoder(trained, tmp_path):
    cli, rng = trained["cli"], np.random.default_rng(9)
    paths = []
    for colour in ("red", "blue", "green"):
        paths.append(tmp_path / f"{colour}.png")
        Image.fromarray(photo(colour, rng)).save(paths[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_text("no image")
    for extra in ([], ["--beam", "3"], ["--temperature", "0.2"]):
        result = cli("predict", "caption", "--run", "tiny", *paths, broken, *extra, "--json", expect=2)
        rows = json.loads(result.stdout)
        assert [r["input"] for r in rows] == [str(p) for p in paths] + [str(broken)]
        for colour, row in zip(("red", "blue", "green"), rows):
            words = row["caption"].split()
            assert colour in words and "#UNK#" not in words and len(words) <= 18, (extra, row)
        assert "broken.jpg" in rows[3]["error"]
    text = cli("predict", "caption", "--run", "tiny", paths[0]).stdout
    assert text.startswith(f"{paths[0]}: a red")
    result = cli("predict", "caption", paths[0], "--beam", "2", "--temperature", "1", expect=2)
    assert "not both" in result.stderr


def test_caption_samples_view(trained):
    view = trained["cli"].json("visualize", "caption-samples", "--run", "tiny", "--n", "4", "--beam", "2")
    assert_drawn(view["path"])


def test_bad_captions_folder_and_offline_weights(cli, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    result = cli("train", "caption", "--dataset", f"captions:{tmp_path / 'empty'}", *SMALL, expect=2)
    assert "captions.txt" in result.stderr
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    folder = make_captions(tmp_path / "c", per_colour=1)
    result = cli("train", "caption", "--dataset", f"captions:{folder}", "--backbone", "inception_v3", "--epochs", "1",
                 expect=1)
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in result.stderr
    assert "--weights PATH" in result.stderr and "--weights none" in result.stderr


@pytest.mark.slow
def test_flickr8k_beats_the_baselines(cli):
    """800 real Flickr8k photos with the pretrained encoder: the image must tell the decoder
    something a text-only model cannot know."""
    folder = shared_data("flickr8k")
    cli("train", "caption", "--dataset", f"captions:{folder}", "--quiet")
    metrics = cli.json("eval", "caption")["metrics"]
    assert metrics["greedy_bleu_4"] > metrics["baseline_bleu_4"] + 0.05
    assert metrics["next_word_accuracy"] >= metrics["baseline_next_word_accuracy"] + 0.03
