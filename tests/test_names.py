"""Task names: vocabulary, bits per character, the bigram baseline, sampling, and the task end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dlcli.cli import app
from dlcli.runs.run import Run
from dlcli.tasks import names
from tests.conftest import assert_drawn, shared_data



# -- pieces -------------------------------------------------------------------------------


def test_vocab_round_trip(tmp_path):
    vocab = names.Vocab(["A", "a", "l", "é"], longest=7)
    vocab.save(tmp_path / "vocab.json")
    again = names.Vocab.load(tmp_path / "vocab.json")
    assert again.tokens == vocab.tokens and again.longest == 7
    assert again.decode(again.encode("Aléa")) == "Aléa"
    assert again.unknown("Al3x") == ["3", "x"]


def test_inputs_and_targets_share_one_padding_mask():
    vocab = names.Vocab(["a", "b"], longest=3)
    x, y = names.to_arrays(["ab", "bab"], vocab)
    a, b = vocab.encode("ab")
    np.testing.assert_array_equal(x, [[names.START, a, b, 0], [names.START, b, a, b]])
    np.testing.assert_array_equal(y, [[a, b, names.END, 0], [b, a, b, names.END]])
    np.testing.assert_array_equal(x != names.PAD, y != names.PAD)  # what Keras masks is what is scored


def test_bigram_bits_per_char_by_hand():
    # Counts after training on "ab": <start>->a, a->b, b-><end>. Add-one over the 3 tokens
    # that can follow (a, b, <end>): a seen pair has (1+1)/(1+3) = 1/2, an unseen one 1/4.
    vocab = names.Vocab(["a", "b"], longest=2)
    assert names.bigram_bpc(["ab"], ["ab"], vocab) == pytest.approx(1.0)  # -log2(1/2) each
    assert names.bigram_bpc(["ab"], ["ba"], vocab) == pytest.approx(2.0)  # -log2(1/4) each
    # "a": <start>->a (1/2), a-><end> (1/4): (1 + 2) / 2 predicted tokens.
    assert names.bigram_bpc(["ab"], ["a"], vocab) == pytest.approx(1.5)
    table = names.bigram_table(["ab", "b"], vocab)
    np.testing.assert_allclose(table[[names.START, 3, 4]].sum(axis=1), 1.0)
    assert table[:, [names.PAD, names.START]].max() == 0


def test_bits_per_char_ignores_padding():
    y = np.array([[3, 2, 0, 0], [3, 3, 3, 2]])
    uniform = np.full((2, 4, 4), 0.25)
    assert names.bits_per_char(uniform, y) == pytest.approx(2.0)
    sure = np.eye(4)[y]
    sure[y == names.PAD] = 0.0  # a padded position would cost 40 bits if it were scored
    assert names.bits_per_char(sure, y) == pytest.approx(0.0)


def test_census_names_are_title_case_and_unique():
    found = names.census_names()
    assert len(found) > 4000 and len(set(found)) == len(found)
    assert "Mary" in found and "James" in found and all(n == n.title() for n in found)


def test_split_is_seeded_disjoint_and_complete():
    lines = [f"n{i}" for i in range(50)]
    train, val = names.split_lines(lines, 0.2, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == sorted(lines)
    assert names.split_lines(lines, 0.2, seed=3) == (train, val)
    assert names.split_lines(lines, 0.2, seed=4) != (train, val)


@pytest.mark.parametrize("model", names.CHOICES["model"])
def test_every_cell_builds_with_two_layers(model):
    cfg = {**names.DEFAULTS, "model": model, "layers": 2, "units": 8}
    net = names.build_model(cfg, vocab_size=7)
    assert net.output_shape == (None, None, 7)
    assert sum(model in layer.name for layer in net.layers) == 2


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A small GRU run on 600 census names, trained once for the tests below: (root, metrics, data)."""
    tmp = tmp_path_factory.mktemp("names")
    data = tmp / "names.txt"
    data.write_text("\n".join(names.census_names()[:600]) + "\n")
    result = CliRunner().invoke(app, [
        "train", "names", "--dataset", f"text:{data}", "--run", "small", "--epochs", "4", "--units", "48",
        "--samples", "50", "--json", "--quiet", "--runs-dir", str(tmp / "runs")])
    assert result.exit_code == 0, result.stderr
    return tmp / "runs", json.loads(result.stdout), data


@pytest.fixture
def trained(small_run, cli):
    """(cli on the small run's checkpoint root, its train output, its data file)."""
    cli.root = small_run[0]
    return cli, small_run[1], small_run[2]


def test_training_lowers_the_loss_and_saves_the_run(trained):
    cli, out, _ = trained
    run_dir = cli.root / "names" / "small"
    history = Run("names", run_dir).read_history()
    assert len(history) == 4
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    metrics = out["metrics"]
    assert metrics["train_names"] == 540 and metrics["val_names"] == 60
    # val_loss is Keras's masked mean in nats; val_bpc the same quantity in bits, computed apart.
    assert metrics["val_bpc"] == pytest.approx(metrics["val_loss"] / math.log(2), rel=0.02)
    assert 0 < metrics["new_share"] <= 1 and 0 < metrics["distinct_share"] <= 1
    vocab = names.Vocab.load(run_dir / "vocab.json")
    assert vocab.tokens[:3] == names.SPECIAL_TOKENS and "A" in vocab.chars
    assert len((run_dir / "train_names.txt").read_text().splitlines()) == 540


def test_eval_repeats_the_training_metrics(trained):
    cli, out, _ = trained
    metrics = cli.json("eval", "names")["metrics"]
    assert metrics["val_bpc"] == pytest.approx(out["metrics"]["val_bpc"], rel=1e-5)
    assert metrics["bigram_val_bpc"] == pytest.approx(out["metrics"]["bigram_val_bpc"], rel=1e-9)


def test_eval_on_other_data_scores_every_name(trained, tmp_path):
    """All 30 names of another file, not the 10 % the run's seed would hold out of it."""
    cli, _, data = trained
    other = tmp_path / "other.txt"
    other.write_text("\n".join(data.read_text().split()[-30:]) + "\n")
    result = cli("eval", "names", "--dataset", f"text:{other}", "--json")
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["names"] == 30 and metrics["skipped_names"] == 0 and "val_names" not in metrics
    assert 0 < metrics["bpc"] < metrics["bigram_bpc"] + 1
    assert "all 30 names" in result.stderr


def test_eval_skips_and_counts_names_with_unseen_characters(trained, tmp_path):
    """A space or a hyphen the model never saw is skipped in its name, not a refusal of the whole file."""
    cli, _, data = trained
    plain = data.read_text().split()[:12]
    other = tmp_path / "spaced.txt"
    other.write_text("\n".join([*plain[:6], "Mary Ann", "Jean-Luc", *plain[6:], "Anne-Marie Rose"]) + "\n")
    result = cli("eval", "names", "--dataset", f"text:{other}", "--json")
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["names"] == 12 and metrics["skipped_names"] == 3
    assert "skipped 3 of 15 names" in result.stderr and "' -'" in result.stderr and np.isfinite(metrics["bpc"])
    only_unseen = tmp_path / "unseen.txt"
    only_unseen.write_text("Mary Ann\nJean-Luc\n")
    result = cli("eval", "names", "--dataset", f"text:{only_unseen}", expect=2)
    assert "none of its 2 names" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_predict_with_a_prefix_is_seeded_and_mostly_distinct(trained):
    cli = trained[0]
    args = ("predict", "names", "--n", "25", "--prefix", "Al", "--temperature", "0.8", "--seed", "1")
    rows = cli.json(*args)
    sampled = [r["name"] for r in rows]
    assert len(sampled) == 25 and all(s.startswith("Al") and r["text"] == s for s, r in zip(sampled, rows))
    assert len(set(sampled)) >= 13  # the course's check: most of 25 names after "Al" differ
    assert cli(*args).stdout.split() == sampled  # plain output: one name a line, same seed same names
    assert [r["name"] for r in cli.json(*args[:-1], "2")] != sampled


def test_predict_excluding_training_names(trained):
    cli, _, data = trained
    rows = cli.json("predict", "names", "--n", "10", "--exclude-training", "--top-k", "5", "--max-length", "8")
    seen = set(data.read_text().split())
    assert len(rows) == 10 and len({r["name"] for r in rows}) == 10
    assert all(r["new"] and r["name"] not in seen and len(r["name"]) <= 8 for r in rows)


@pytest.mark.parametrize("args, message", [
    (("--prefix", "Al3"), "characters the model never saw: '3'"),
    (("--temperature", "0"), "--temperature must be > 0"),
    (("--n", "0"), "--n must be >= 1"),
    (("--tempo", "1"), "unknown option --tempo"),
    (("some.txt",), "takes no input files"),
])
def test_bad_predict_input_is_one_line_exit_2(trained, args, message):
    result = trained[0]("predict", "names", *args, expect=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_views_draw_pngs(trained, tmp_path):
    cli = trained[0]
    path = cli.json("visualize", "names-samples", "--n", "5", "--prefix", "Ma")["path"]
    assert_drawn(path)
    out = tmp_path / "next.png"
    cli.json("visualize", "names-next-char", "--name", "Mary", "--out", str(out))
    assert_drawn(out)
    result = cli("visualize", "names-next-char", "--name", "M4ry", expect=2)
    assert "'4'" in result.stderr


def test_bad_datasets_are_usage_errors(tmp_path, cli):
    one, binary = tmp_path / "one.txt", tmp_path / "bin.txt"
    one.write_text("Solo\n\n")
    binary.write_bytes(b"\xff\xfe\x00abc\n")
    for run, dataset, message in [("a", "mnist", "takes census (the default) or text:PATH"),
                                  ("b", f"text:{one}", "at least 2"),
                                  ("c", f"text:{binary}", "not UTF-8")]:
        result = cli("train", "names", "--dataset", dataset, "--run", run, "--epochs", "1", expect=2)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# -- the course's data ----------------------------------------------------------------------------


@pytest.mark.slow
def test_course_names_beat_the_bigram(cli):
    data = shared_data("names/course_names.txt")
    metrics = cli.json("train", "names", "--dataset", f"text:{data}", "--quiet")["metrics"]
    assert metrics["val_bpc"] < metrics["bigram_val_bpc"] - 0.3
    rows = cli.json("predict", "names", "--n", "25", "--prefix", "Al", "--temperature", "0.8", "--seed", "1")
    assert len({r["name"] for r in rows}) >= 20
