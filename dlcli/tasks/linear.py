"""Task `linear`: logistic and linear regression trained by hand-written optimizers (NumPy only).

Week 1 of the course: a linear model on 2-D points with a circular class boundary,
made separable by the quadratic features [x0, x1, x0^2, x1^2, x0*x1, 1]. The gradient
is derived by hand, and so is every optimizer, with the course's update formulas:

    sgd        w -= lr * g
    momentum   nu = a * nu + lr * g;              w -= nu
    nesterov   nu = a * nu + lr * g(w - a * nu);  w -= nu
    adagrad    G += g^2;                          w -= lr * g / sqrt(G + eps)
    rmsprop    G = a * G + (1 - a) * g^2;         w -= lr * g / sqrt(G + eps)
    adam       m, v = moving means of g and g^2 (bias-corrected); w -= lr * m / (sqrt(v) + eps)

Mini-batches are drawn with replacement, as in the course. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dlcli.data import sources as data_lib
from dlcli.runs.checkpoints import non_finite_error, resume_point, soundness, stopped
from dlcli.errors import UsageError
from dlcli.engine.interrupts import StopOnSignal
from dlcli.runs.files import atomic_write_npz, link_or_copy
from dlcli.tasks import Context, DataRules, Option, TaskSpec, View, common_defaults

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
# The course's settings for the optimizer comparison (seed 42, 100 iterations, batch 4).
COURSE_LR = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.1, "rmsprop": 0.1, "adam": 0.1}

DEFAULTS = {
    **common_defaults(dataset="circles", epochs=20, batch_size=16, lr=0.1),
    "mode": "logistic",
    "features": "quadratic",
    "optimizer": "adam",
    "alpha": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "l1": 0.0,
    "l2": 0.0,
    "steps_per_epoch": 50,
    "val_fraction": 0.2,
    "n_points": 826,
}
CHOICES = {"mode": ["logistic", "regression"], "features": ["quadratic", "linear"], "optimizer": list(OPTIMIZERS)}


# -- data -----------------------------------------------------------------------------


def make_circles(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D Gaussian points, label 1 inside a noisy circle of radius 1.4 (like the course's)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    radius = np.sqrt((x**2).sum(1)) + rng.normal(scale=0.25, size=n)
    return x, (radius < 1.4).astype(np.float64)


def load_data(cfg: dict) -> dict:
    """{"x_train", "y_train", "x_val", "y_val"} from the generated circles or an .npz file."""
    if cfg["dataset"] == "circles":
        x, y = make_circles(cfg["n_points"], cfg["seed"] or 0)
    else:
        kind, path = data_lib.parse_dataset(cfg["dataset"], allowed=("npz",))
        arrays = data_lib.load_npz(path, keys=("x_train", "y_train"))
        x, y = arrays["x_train"].astype(np.float64), arrays["y_train"].astype(np.float64).ravel()
        if x.ndim != 2 or x.shape[1] != 2 or len(x) != len(y):
            raise UsageError(f"{path}: x_train must be (N, 2) points and y_train (N,) targets")
        if "x_test" in arrays and "y_test" in arrays:
            return {"x_train": x, "y_train": y, "x_val": arrays["x_test"].astype(np.float64),
                    "y_val": arrays["y_test"].astype(np.float64).ravel()}
    order = np.random.default_rng(cfg["seed"] or 0).permutation(len(x))
    n_val = int(round(len(x) * cfg["val_fraction"]))
    val, train = order[:n_val], order[n_val:]
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


def eval_points(cfg: dict, other_data: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(points, targets, metric prefix) that `eval` scores.

    The run's own data: its validation points ("val_"). Other data (`eval --dataset OTHER`):
    the npz's test arrays where it has them ("test_"), else every point of it (""); the
    generated circles: all `n_points` of them.
    """
    if not other_data:
        data = load_data(cfg)
        return data["x_val"], data["y_val"], "val_"
    if cfg["dataset"] == "circles":
        return (*make_circles(cfg["n_points"], cfg["seed"] or 0), "")
    _, path = data_lib.parse_dataset(cfg["dataset"], allowed=("npz",))
    arrays = data_lib.load_npz(path, keys=())
    for xk, yk, prefix in (("x_test", "y_test", "test_"), ("x_train", "y_train", "")):
        if xk in arrays and yk in arrays:
            x, y = arrays[xk].astype(np.float64), arrays[yk].astype(np.float64).ravel()
            if x.ndim != 2 or x.shape[1] != 2 or len(x) != len(y):
                raise UsageError(f"{path}: {xk} must be (N, 2) points and {yk} (N,) targets")
            return x, y, prefix
    raise UsageError(f"{path} has neither x_test and y_test nor x_train and y_train "
                     f"(it has {', '.join(arrays) or 'no arrays'})")


def expand(x: np.ndarray, features: str = "quadratic") -> np.ndarray:
    """[x0, x1, x0^2, x1^2, x0*x1, 1] (quadratic) or [x0, x1, 1] (linear)."""
    x = np.asarray(x, dtype=np.float64)
    ones = np.ones((len(x), 1))
    if features == "linear":
        return np.hstack([x, ones])
    return np.hstack([x, x**2, x[:, :1] * x[:, 1:2], ones])


# -- model: loss and its hand-derived gradient ---------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))  # stable for large |z|


def predict_values(w: np.ndarray, X: np.ndarray, mode: str) -> np.ndarray:
    z = X @ w
    return sigmoid(z) if mode == "logistic" else z


def loss(w: np.ndarray, X: np.ndarray, y: np.ndarray, mode: str, l1: float = 0.0, l2: float = 0.0) -> float:
    """Mean log-loss (logistic) or mean squared error (regression), plus penalties.

    The penalties leave out the bias (the last weight), as is usual.
    """
    if mode == "logistic":
        p = np.clip(sigmoid(X @ w), 1e-12, 1 - 1e-12)
        data = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    else:
        data = np.mean((X @ w - y) ** 2)
    wb = w[:-1]
    return float(data + l1 * np.abs(wb).sum() + l2 * (wb**2).sum())


def gradient(w: np.ndarray, X: np.ndarray, y: np.ndarray, mode: str, l1: float = 0.0, l2: float = 0.0) -> np.ndarray:
    """d loss / d w, derived by hand: X^T (p - y) / n for log-loss, 2 X^T (Xw - y) / n for MSE."""
    n = len(y)
    if mode == "logistic":
        g = X.T @ (sigmoid(X @ w) - y) / n
    else:
        g = 2 * X.T @ (X @ w - y) / n
    penalty = l1 * np.sign(w) + 2 * l2 * w
    penalty[-1] = 0.0
    return g + penalty


# -- optimizers ------------------------------------------------------------------------


class Optimizer:
    """One of the course's update rules; `state` holds its slots so a run can resume."""

    def __init__(self, name: str, lr: float, alpha: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        if name not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
        self.name, self.lr, self.alpha, self.beta2, self.eps = name, lr, alpha, beta2, eps
        self.state: dict[str, np.ndarray] = {}

    def step(self, w: np.ndarray, grad_fn) -> np.ndarray:
        lr, a, eps = self.lr, self.alpha, self.eps
        s = self.state
        if self.name == "sgd":
            return w - lr * grad_fn(w)
        if self.name in ("momentum", "nesterov"):
            nu = s.get("nu", np.zeros_like(w))
            g = grad_fn(w - a * nu) if self.name == "nesterov" else grad_fn(w)
            s["nu"] = a * nu + lr * g
            return w - s["nu"]
        g = grad_fn(w)
        if self.name == "adagrad":
            s["G"] = s.get("G", np.zeros_like(w)) + g**2
            return w - lr * g / np.sqrt(s["G"] + eps)
        if self.name == "rmsprop":
            s["G"] = a * s.get("G", np.zeros_like(w)) + (1 - a) * g**2
            return w - lr * g / np.sqrt(s["G"] + eps)
        # adam
        t = s.get("t", np.zeros(1)) + 1
        s["t"] = t
        s["m"] = a * s.get("m", np.zeros_like(w)) + (1 - a) * g
        s["v"] = self.beta2 * s.get("v", np.zeros_like(w)) + (1 - self.beta2) * g**2
        m_hat = s["m"] / (1 - a**t)
        v_hat = s["v"] / (1 - self.beta2**t)
        return w - lr * m_hat / (np.sqrt(v_hat) + eps)


def initial_weights(n_features: int) -> np.ndarray:
    """The course's start: zeros with a bias of 1."""
    w = np.zeros(n_features)
    w[-1] = 1.0
    return w


def run_optimizer(X, y, name: str, lr: float, iterations: int, batch_size: int, seed: int,
                  mode: str = "logistic", alpha: float = 0.9, l1: float = 0.0, l2: float = 0.0) -> list[float]:
    """The course's experiment: full-data loss after each of `iterations` mini-batch steps."""
    rng = np.random.default_rng(seed)
    w = initial_weights(X.shape[1])
    opt = Optimizer(name, lr, alpha=alpha)
    losses = []
    for _ in range(iterations):
        idx = rng.integers(0, len(X), size=batch_size)
        w = opt.step(w, lambda v: gradient(v, X[idx], y[idx], mode, l1, l2))
        losses.append(loss(w, X, y, mode, l1, l2))
    return losses


# -- train / evaluate / predict ----------------------------------------------------------


def _metrics(w, X, y, cfg, prefix="") -> dict:
    out = {f"{prefix}loss": loss(w, X, y, cfg["mode"], cfg["l1"], cfg["l2"])}
    pred = predict_values(w, X, cfg["mode"])
    if cfg["mode"] == "logistic":
        out[f"{prefix}accuracy"] = float(np.mean((pred > 0.5) == (y > 0.5)))
    else:
        out[f"{prefix}mse"] = float(np.mean((pred - y) ** 2))
    return out


def _save_model(path: Path, w: np.ndarray, cfg: dict) -> None:
    meta = json.dumps({"task": "linear", "mode": cfg["mode"], "features": cfg["features"]})
    atomic_write_npz(path, w=w, meta=np.array(meta))


def load_model(path: Path) -> tuple[np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            w = f["w"]
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError):
        raise UsageError(f"checkpoint {path} is not a linear model (corrupt or another format)") from None
    if not isinstance(meta, dict) or not (isinstance(w, np.ndarray) and w.ndim == 1 and w.dtype.kind == "f"):
        raise UsageError(f"checkpoint {path} is not a linear model (its weights or description are damaged)")
    if meta.get("task") != "linear":
        raise UsageError(f"checkpoint {path} belongs to task {meta.get('task')}, not linear")
    return w, meta


def train(ctx: Context) -> dict:
    cfg, run, reporter = ctx.cfg, ctx.run, ctx.reporter
    data = load_data(cfg)
    X, y = expand(data["x_train"], cfg["features"]), data["y_train"]
    Xv, yv = expand(data["x_val"], cfg["features"]), data["y_val"]
    opt = Optimizer(cfg["optimizer"], cfg["lr"], cfg["alpha"], cfg["beta2"], cfg["eps"])
    point = resume_point(ctx)  # the Keras loop's reading of --resume: epochs done, history
    w, start, history = initial_weights(X.shape[1]), point.epochs_done, point.history
    if point.backup is not None:
        with np.load(point.backup / "state.npz", allow_pickle=False) as f:
            w = f["w"]
            opt.state = {k[4:]: f[k] for k in f.files if k.startswith("opt_")}
    reporter.start(cfg["epochs"], initial_epoch=start)
    with StopOnSignal() as stop:
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is reported below
                _train_epochs(ctx, X, y, Xv, yv, w, opt, start, history, stop)
        finally:
            reporter.finish()
    if start >= cfg["epochs"]:  # stopped after its last checkpoint: history.csv may lack the last row
        run.write_history(history)
    link_or_copy(run.latest_backup() / "model.npz", run.file("model.npz"))
    return {k: v for k, v in history[-1].items() if k != "epoch"}


def _train_epochs(ctx, X, y, Xv, yv, w, opt, start, history, stop) -> None:
    """The epoch loop: each epoch's batches come from (seed, epoch), then a checkpoint."""
    cfg, run, reporter = ctx.cfg, ctx.run, ctx.reporter
    for epoch in range(start, cfg["epochs"]):
        rng = np.random.default_rng([cfg["seed"] or 0, epoch])
        reporter.start_epoch(epoch, cfg["steps_per_epoch"])
        for step in range(cfg["steps_per_epoch"]):
            idx = rng.integers(0, len(X), size=cfg["batch_size"])
            w = opt.step(w, lambda v: gradient(v, X[idx], y[idx], cfg["mode"], cfg["l1"], cfg["l2"]))
            reporter.batch(step, {"batch_loss": loss(w, X[idx], y[idx], cfg["mode"], cfg["l1"], cfg["l2"])})
        if not np.all(np.isfinite(w)):
            raise non_finite_error(run, f"the weights became NaN or infinite in epoch {epoch + 1}")
        logs = {**_metrics(w, X, y, cfg), **_metrics(w, Xv, yv, cfg, "val_")}
        history.append({"epoch": epoch + 1, **logs})
        state = {"w": w, **{f"opt_{k}": v for k, v in opt.state.items()}}
        run.save_backup(epoch + 1, history, {"state.npz": lambda p: np.savez(p, **state),
                                         "model.npz": lambda p: _save_model(p, w, cfg)},
                        extra=soundness(logs.get("loss"), float(np.max(np.abs(w)))))
        run.write_history(history)
        reporter.end_epoch(epoch, logs)
        if stop.requested:
            raise stopped(stop, run, f"after epoch {epoch + 1}")


def evaluate(ctx: Context) -> dict:
    w, meta = load_model(ctx.model_path)
    cfg = {**ctx.cfg, **meta}
    other = ctx.on_other_data
    x, y, prefix = eval_points(cfg, other)
    if other:
        what = "test points" if prefix else "points"
        ctx.reporter.info(f"evaluating all {len(x)} {what} of {cfg['dataset']} (not the run's training data)")
    return {**_metrics(w, expand(x, cfg["features"]), y, cfg, prefix), f"{prefix}points": int(len(x))}


def _parse_point(text: str) -> np.ndarray:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise UsageError(f"{text!r} is not a point; write it as x0,x1 (for example 0.5,-1.2)")
    if not all(np.isfinite(values)):
        raise UsageError(f"{text!r}: coordinates must be finite numbers")
    return np.array(values)


def predict(ctx: Context, inputs: list[str]) -> list[dict]:
    if not inputs:
        raise UsageError("give points to predict, as x0,x1 (for example `dlcli predict linear 0.5,-1.2 2,2`)")
    w, meta = load_model(ctx.model_path)
    rows = []
    for text in inputs:
        try:
            point = _parse_point(text)
        except UsageError as exc:
            rows.append({"input": text, "error": str(exc)})
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            value = float(predict_values(w, expand(point[None], meta["features"]), meta["mode"])[0])
        if not np.isfinite(value):  # the quadratic features overflow far out (|x| above ~1e154)
            rows.append({"input": text, "error": f"{text!r}: too far out for the model (its features overflow)"})
            continue
        key = "probability" if meta["mode"] == "logistic" else "value"
        row = {"input": text, key: round(value, 6)}
        if meta["mode"] == "logistic":
            row["label"] = int(value > 0.5)
        rows.append(row)
    return rows


# -- views --------------------------------------------------------------------------------


def view_boundary(ctx: Context) -> Path:
    """Predicted probability as a filled contour over the plane, with the points."""
    from dlcli.plots import pyplot, save_figure

    w, meta = load_model(ctx.model_path)
    data = load_data({**ctx.cfg, **meta})
    x, y = np.vstack([data["x_train"], data["x_val"]]), np.concatenate([data["y_train"], data["y_val"]])
    pad = 0.5
    xx, yy = np.meshgrid(
        np.linspace(x[:, 0].min() - pad, x[:, 0].max() + pad, 200),
        np.linspace(x[:, 1].min() - pad, x[:, 1].max() + pad, 200),
    )
    grid = np.c_[xx.ravel(), yy.ravel()]
    zz = predict_values(w, expand(grid, meta["features"]), meta["mode"]).reshape(xx.shape)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cs = ax.contourf(xx, yy, zz, levels=20, cmap="RdBu_r", alpha=0.55)
    fig.colorbar(cs, ax=ax, label="P(y=1)" if meta["mode"] == "logistic" else "prediction")
    # The points in colours the background never takes: white and black, each edged with the
    # other, so both classes stand out on both the red and the blue side.
    if meta["mode"] == "logistic":
        ax.contour(xx, yy, zz, levels=[0.5], colors="k", linewidths=1.2)
        for label, face, edge, marker in ((0, "white", "black", "o"), (1, "black", "white", "^")):
            mask = y == label
            ax.scatter(x[mask, 0], x[mask, 1], c=face, edgecolors=edge, linewidths=0.6, s=18, marker=marker,
                       label=f"y = {label}")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    else:
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="viridis", edgecolors="white", linewidths=0.6, s=18)
    ax.set_title(f"linear / {ctx.run.name}: {meta['mode']}, {meta['features']} features")
    return save_figure(fig, ctx.view_path("linear-boundary"))


def view_optimizers(ctx: Context) -> Path:
    """Loss curves of every optimizer on the run's data, with the course's settings."""
    from dlcli.plots import pyplot, save_figure

    opts = {**ctx.options, "seed": ctx.cfg["seed"] or 0}
    data = load_data(ctx.cfg)
    X, y = expand(data["x_train"], ctx.cfg["features"]), data["y_train"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in OPTIMIZERS:
        curve = run_optimizer(X, y, name, COURSE_LR[name], opts["iterations"], opts["batch"], opts["seed"],
                              mode=ctx.cfg["mode"])
        ax.plot(range(1, len(curve) + 1), curve, label=f"{name} (lr {COURSE_LR[name]})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss on the training data")
    ax.set_title(f"optimizers: seed {opts['seed']}, batch {opts['batch']} drawn with replacement")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, ctx.view_path("linear-optimizers"))


# What this task's own config keys mean (and its own meaning of shared ones), for
# `dlcli tasks TASK` and `train --help`; keys every task shares are in `config.KEY_HELP`.
KEY_HELP = {
    "dataset": "circles (generated 2-D points, the default) or npz:PATH with x_train (N, 2) and y_train (N,)",
    "mode": "logistic: classification with log-loss; regression: mean squared error",
    "features": "quadratic: [x0, x1, x0^2, x1^2, x0*x1, 1]; linear: [x0, x1, 1]",
    "optimizer": "the hand-written update rule",
    "alpha": "momentum / first-moment decay (momentum, nesterov, rmsprop, adam)",
    "beta2": "second-moment decay of adam",
    "eps": "added to the denominator of adagrad, rmsprop and adam",
    "l1": "L1 penalty on the weights",
    "l2": "L2 penalty on the weights",
    "steps_per_epoch": "mini-batches per epoch (drawn with replacement)",
    "n_points": "how many points the generated circles data has",
}


TASK = TaskSpec(
    name="linear",
    summary="logistic / linear regression with hand-written optimizers (NumPy)",
    defaults=DEFAULTS,
    data=DataRules(kinds=("npz",), builtin=("circles",), npz_keys=("x_train", "y_train")),
    choices=CHOICES,
    train=train,
    evaluate=evaluate,
    predict=predict,
    model_file="model.npz",
    views={
        "linear-boundary": View(view_boundary, "predicted probability over the plane, with the points"),
        "linear-optimizers": View(
            view_optimizers,
            "loss curves of all six optimizers on the same data (course settings)",
            options={
                "iterations": Option(int, 100, "iterations per optimizer"),
                "batch": Option(int, 4, "batch size"),
            },
        ),
    },
    key_help=KEY_HELP,
)
