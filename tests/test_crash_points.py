"""A crash at every write: DLCLI_FAULT_AT=N kills a training run (SIGKILL) at the N-th write,
fsync, rename or delete of its files; the run is then resumed and must end exactly as an
uninterrupted run did.

For each point: the killed process died by SIGKILL; every checkpoint it left loads, with finite
weights; `--resume` finishes the run; no temporary file remains; history.csv and the final
weights are identical to the uninterrupted run's. The default test run keeps a sample of the
points (those where earlier versions broke, see `SAMPLED`); `pytest -m crash` sweeps all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Cli, digit_images, make_faces

TASKS = ("mnist", "gan", "linear")


def _data_args(task: str, data: Path) -> list[str]:
    if task == "mnist":  # 64 training images in batches of 8: 8 steps per epoch, a checkpoint every 3
        return ["--dataset", f"npz:{data}", "--epochs", "2", "--batch-size", "8", "--set", "val_size=16",
                "--set", "save_every_steps=3"]
    if task == "gan":  # 18 training faces in batches of 4: 4 steps per epoch, a checkpoint every 3
        return ["--dataset", f"folder:{data}", "--epochs", "2", "--batch-size", "4", "--set", "val_fraction=0.25",
                "--set", "code_size=16", "--set", "width=32", "--set", "kid_samples=6", "--set", "kid_image_size=32",
                "--set", "save_every_steps=3"]
    return ["--epochs", "3", "--set", "steps_per_epoch=5", "--set", "n_points=60"]


class Scenario:
    """One task's short run: its data, the uninterrupted reference and its list of write points."""

    def __init__(self, task: str, tmp: Path):
        self.task, self.tmp = task, tmp
        if task == "mnist":
            x, y = digit_images(8, seed=3)
            data = tmp / "digits.npz"
            np.savez(data, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
        elif task == "gan":
            data = make_faces(tmp / "faces", 24, seed=2)
        else:
            data = None
        self.args = _data_args(task, data)
        self.root = tmp / "runs"
        trace = tmp / "trace.txt"
        self.train("straight", env={"DLCLI_FAULT_TRACE": str(trace)}, check=True)
        self.points = trace.read_text().splitlines()
        self.reference = self.outcome("straight")

    def command(self, run: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "dlcli", "train", self.task, *self.args, "--run", run,
                "--runs-dir", str(self.root), "--quiet", *extra]

    def train(self, run: str, *extra: str, env: dict | None = None, check: bool = False):
        result = subprocess.run(self.command(run, *extra), capture_output=True, text=True,
                                env={**os.environ, **(env or {})}, timeout=300)
        if check:
            assert result.returncode == 0, result.stderr[-3000:]
        return result

    def model_files(self, folder: Path) -> list[Path]:
        names = {"mnist": ["model.keras"], "gan": ["generator.keras", "discriminator.keras"],
                 "linear": ["model.npz"]}[self.task]
        return [folder / name for name in names]

    def weights(self, path: Path) -> list[np.ndarray]:
        if path.suffix == ".npz":
            with np.load(path) as f:
                return [f["w"]]
        import keras

        return [np.asarray(w) for w in keras.models.load_model(path, compile=False).get_weights()]

    def outcome(self, run: str) -> dict:
        run_dir = self.root / self.task / run
        return {"history": (run_dir / "history.csv").read_text(),
                "weights": [w for path in self.model_files(run_dir) for w in self.weights(path)]}


@pytest.fixture(scope="module", params=TASKS)
def scenario(request, tmp_path_factory):
    return Scenario(request.param, tmp_path_factory.mktemp(f"crash-{request.param}"))


def check_point(scenario: Scenario, n: int) -> None:
    run = f"killed-{n}"
    killed = scenario.train(run, env={"DLCLI_FAULT_AT": str(n)})
    where = scenario.points[n - 1]
    assert killed.returncode == -9, (where, killed.returncode, killed.stderr[-2000:])
    run_dir = scenario.root / scenario.task / run
    backup = run_dir / "backup"
    for checkpoint in sorted(backup.glob("epoch-*")) if backup.is_dir() else []:
        assert (checkpoint / "state.json").exists(), (where, checkpoint)
        for path in scenario.model_files(checkpoint):
            assert all(np.isfinite(w).all() for w in scenario.weights(path)), (where, path)
    if not (run_dir / "metrics.json").exists():  # killed after metrics.json: the run had finished
        resumed = scenario.train(run, "--resume")
        assert resumed.returncode == 0, (where, resumed.stderr[-2000:])
    leftovers = [p for p in run_dir.rglob("*") if ".tmp-" in p.name or ".trash-" in p.name]
    assert not leftovers, (where, leftovers)
    outcome = scenario.outcome(run)
    assert outcome["history"] == scenario.reference["history"], where
    assert len(outcome["weights"]) == len(scenario.reference["weights"])
    for got, want in zip(outcome["weights"], scenario.reference["weights"]):
        np.testing.assert_array_equal(got, want, err_msg=where)


# The points where earlier versions broke: a mid-epoch checkpoint's state written but not
# renamed, the last checkpoint renamed before metrics.json, history.csv's temporary file.
# Each process start costs seconds, so the default run gives mnist and the gan one kind each
# and linear (NumPy, fast, no mid-epoch checkpoints) the other two; `pytest -m crash` sweeps
# every point of every task.
KNOWN_BREAKS = {
    "mid-epoch state": lambda p: "step-" in p and "state.json" in p and " fsync " in p,
    "epoch rename": lambda p: " rename " in p and "/backup/epoch-" in p,
    "history temp": lambda p: "history.csv.tmp" in p and " fsync " in p,
}
SAMPLED = {"mnist": ["mid-epoch state"], "gan": ["epoch rename"], "linear": ["epoch rename", "history temp"]}


def sample(task: str, points: list[str]) -> list[int]:
    """The last write point of each kind sampled for `task` (1-based)."""
    wanted = []
    for kind in SAMPLED[task]:
        hits = [i + 1 for i, p in enumerate(points) if KNOWN_BREAKS[kind](p)]
        assert hits, f"{task}: no write point of the kind '{kind}'"
        wanted.append(hits[-1])
    return sorted(set(wanted))


def test_a_sample_of_crash_points_resumes_exactly(scenario):
    for n in sample(scenario.task, scenario.points):
        check_point(scenario, n)


@pytest.mark.crash
def test_every_crash_point_resumes_exactly(scenario):
    print(f"\n{scenario.task}: {len(scenario.points)} write points")
    for n in range(1, len(scenario.points) + 1):
        check_point(scenario, n)
