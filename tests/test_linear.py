"""Task linear: hand-derived gradients, the course's optimizers, and the task end to end."""

import json

import numpy as np
import pytest

from dlcli.tasks import linear
from tests.conftest import assert_drawn


def numeric_gradient(f, w, h=1e-5):
    grad = np.zeros_like(w)
    for i in range(len(w)):
        step = np.zeros_like(w)
        step[i] = h
        grad[i] = (f(w + step) - f(w - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("mode", ["logistic", "regression"])
@pytest.mark.parametrize("l1, l2", [(0.0, 0.0), (0.01, 0.0), (0.0, 0.05), (0.02, 0.03)])
@pytest.mark.parametrize("features", ["quadratic", "linear"])
def test_gradient_matches_numeric(mode, l1, l2, features):
    rng = np.random.default_rng(0)
    x, y = linear.make_circles(40, seed=3)
    X = linear.expand(x, features)
    w = rng.normal(size=X.shape[1])  # away from 0, where |w| has no derivative
    analytic = linear.gradient(w, X, y, mode, l1, l2)
    numeric = numeric_gradient(lambda v: linear.loss(v, X, y, mode, l1, l2), w)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_quadratic_features_are_the_courses():
    X = linear.expand(np.array([[2.0, 3.0]]))
    np.testing.assert_array_equal(X, [[2, 3, 4, 9, 6, 1]])


@pytest.mark.parametrize("name", linear.OPTIMIZERS)
def test_every_optimizer_lowers_the_loss_with_the_course_settings(name):
    x, y = linear.make_circles(826, seed=0)
    X = linear.expand(x)
    start = linear.loss(linear.initial_weights(6), X, y, "logistic")
    curve = linear.run_optimizer(X, y, name, linear.COURSE_LR[name], iterations=100, batch_size=4, seed=42)
    assert len(curve) == 100
    assert np.mean(curve[-10:]) < 0.8 * start, (name, start, curve[-10:])


def test_optimizer_updates_follow_the_course_formulas():
    g = np.array([1.0, -2.0])
    grad = lambda w: g  # noqa: E731
    w0 = np.zeros(2)
    m = linear.Optimizer("momentum", lr=0.05, alpha=0.9)
    w1 = m.step(w0, grad)
    w2 = m.step(w1, grad)
    np.testing.assert_allclose(w1, -0.05 * g)
    np.testing.assert_allclose(w2, w1 - (0.9 * 0.05 * g + 0.05 * g))
    r = linear.Optimizer("rmsprop", lr=0.1, alpha=0.9, eps=1e-8)
    np.testing.assert_allclose(r.step(w0, grad), -0.1 * g / np.sqrt(0.1 * g**2 + 1e-8))


def test_train_eval_predict_visualize(cli, tmp_path):
    out = cli.json("train", "linear", "--run", "a", "--quiet")
    assert out["metrics"]["val_accuracy"] > 0.85
    run_dir = cli.root / "linear" / "a"
    for name in ("config.yaml", "model.npz", "history.csv", "metrics.json"):
        assert (run_dir / name).exists(), name
    assert len((run_dir / "history.csv").read_text().splitlines()) == 1 + out["config"]["epochs"]

    assert cli.json("eval", "linear")["metrics"]["val_accuracy"] == pytest.approx(out["metrics"]["val_accuracy"])
    rows = cli.json("predict", "linear", "0,0", "4,4")
    assert rows[0]["label"] == 1 and rows[1]["label"] == 0  # inside / outside the circle

    for view in ("linear-boundary", "linear-optimizers"):
        assert_drawn(cli.json("visualize", view)["path"])


def test_regression_mode_and_npz_data(cli, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.5
    np.savez(tmp_path / "reg.npz", x_train=x, y_train=y)
    out = cli.json("train", "linear", "--dataset", f"npz:{tmp_path / 'reg.npz'}", "--mode", "regression",
                   "--features", "linear", "--epochs", "30", "--quiet")
    assert out["metrics"]["val_mse"] < 0.01
    assert cli.json("predict", "linear", "1,1")[0]["value"] == pytest.approx(1.5, abs=0.1)


def test_eval_on_other_data_scores_all_of_it_or_its_test_split(cli, tmp_path):
    """All of the other file, not the 20 % of the other file that the run's seed would hold out."""
    cli("train", "linear", "--run", "a", "--epochs", "3", "--quiet")
    x, y = linear.make_circles(150, seed=5)
    np.savez(tmp_path / "all.npz", x_train=x, y_train=y)
    result = cli("eval", "linear", "--dataset", f"npz:{tmp_path / 'all.npz'}", "--json")
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["points"] == 150 and 0.5 < metrics["accuracy"] <= 1 and "val_accuracy" not in metrics
    assert "all 150 points" in result.stderr
    np.savez(tmp_path / "split.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    metrics = cli.json("eval", "linear", "--dataset", f"npz:{tmp_path / 'split.npz'}")["metrics"]
    assert metrics["test_points"] == 50 and "test_accuracy" in metrics
    own = cli.json("eval", "linear")["metrics"]
    assert own["val_points"] == 165  # the run's own data: its held-out 20 % of 826 points


def test_resume_gives_the_same_history_as_an_uninterrupted_run(cli):
    cli("train", "linear", "--run", "straight", "--epochs", "6", "--quiet")
    cli("train", "linear", "--run", "split", "--epochs", "3", "--quiet")
    cli("train", "linear", "--run", "split", "--epochs", "6", "--resume", "--quiet")
    straight = (cli.root / "linear" / "straight" / "history.csv").read_text()
    split = (cli.root / "linear" / "split" / "history.csv").read_text()
    assert straight == split


def test_bad_points_are_reported_per_input(cli):
    cli("train", "linear", "--epochs", "1", "--quiet")
    result = cli("predict", "linear", "1,2", "banana", "--json", expect=2)
    rows = json.loads(result.stdout)
    assert rows[0]["label"] in (0, 1)
    assert "banana" in rows[1]["error"] and "x0,x1" in result.stderr
