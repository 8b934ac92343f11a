"""Shared test fixtures: an in-process CLI runner, a private runs folder, tiny real data.

No test needs ../shared or the network: the network probe points at a closed local
port, so tensorflow-datasets code paths fail fast the way they do offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Three workers on two cores (pyproject.toml): one TensorFlow thread each (and in the runs
    # they start), not every worker spreading over both cores. Set before TensorFlow loads.
    for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from dlcli.cli import app


def shared_data(relative: str) -> Path:
    """A path inside the real data sets (DLCLI_SHARED_DATA), or skip the slow test without them."""
    root = os.environ.get("DLCLI_SHARED_DATA")
    path = Path(root) / relative if root else None
    if path is None or not path.exists():
        pytest.skip(f"set DLCLI_SHARED_DATA to the folder holding {relative}")
    return path


# Seconds each test file takes (`pytest --durations=0`, summed per file, two workers, idle 2 cores).
# pytest-xdist hands whole files to its workers in collection order (`--no-loadscope-reorder`):
# the heaviest go first, so no long file starts when the other worker is nearly done.
FILE_SECONDS = {"test_faults.py": 172, "test_gan.py": 125, "test_finetune.py": 123, "test_crash_points.py": 46,
                "test_mnist.py": 42, "test_exports.py": 40, "test_hostile_inputs.py": 39, "test_predict_batch.py": 33,
                "test_autoencoder.py": 32, "test_caption.py": 31,
                "test_fault_injection.py": 20, "test_serve.py": 20, "test_cnn.py": 14, "test_cli.py": 12}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: each file keeps its order


@pytest.fixture(autouse=True)
def _offline_and_isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DLCLI_NETWORK_PROBE", "127.0.0.1:9")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.delenv("DLCLI_DEBUG", raising=False)


@pytest.fixture
def root(tmp_path) -> Path:
    """A fresh runs folder for the test's runs."""
    return tmp_path / "runs"


class Cli:
    def __init__(self, root: Path):
        self.root = root
        self.runner = CliRunner()

    def __call__(self, *args: str, expect: int | None = 0):
        args = [str(a) for a in args]
        if args and args[0] in ("train", "eval", "predict", "export", "visualize", "tasks"):
            args += ["--runs-dir", str(self.root)]
        result = self.runner.invoke(app, args)
        if expect is not None:
            assert result.exit_code == expect, (
                f"dlcli {' '.join(args)} -> {result.exit_code}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}\nexception: {result.exception!r}"
            )
        return result

    def json(self, *args: str):
        result = self(*args, "--json")
        return json.loads(result.stdout)


@pytest.fixture
def minimal():
    """tests/minimal_task.py registered as task `minimal` for the test."""
    from dlcli import tasks

    tasks.add_task("minimal", "tests.minimal_task")
    yield
    tasks.remove_task("minimal")


@pytest.fixture
def cli(root) -> Cli:
    return Cli(root)


def render_digit(label: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A digit glyph drawn with Pillow's own font, light on dark, at a random size and place."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(18, 27)))
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).text((int(rng.integers(4, 16)), int(rng.integers(0, 8))), str(label), fill=255, font=font)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 12, (size, size))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def digit_images(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiny real 'MNIST': rendered digit glyphs put through MNIST's own centring (28x28 uint8)."""
    from dlcli.tasks.mnist import to_mnist

    rng = np.random.default_rng(seed)
    x, y = [], []
    for label in range(10):
        for _ in range(n_per_class):
            x.append((to_mnist(render_digit(label, rng)) * 255).astype(np.uint8))
            y.append(label)
    order = rng.permutation(len(x))
    return np.array(x, dtype=np.uint8)[order], np.array(y, dtype=np.uint8)[order]


@pytest.fixture
def digits_npz(tmp_path) -> Path:
    x_train, y_train = digit_images(30, seed=1)
    x_test, y_test = digit_images(5, seed=2)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a TF_CONFIG cluster of local workers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_drawn(path: Path, size: tuple[int, int] | None = None, min_colours: int = 8) -> np.ndarray:
    """A view's PNG: a PNG file, about `size` (width, height, within 20 %: figures are saved
    with tight bounding boxes) when given, and not blank (more than a few colours and some
    spread of brightness). Returns its pixels."""
    from PIL import Image

    path = Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as img:
        if size is not None:
            assert all(0.8 * want <= got <= 1.2 * want for got, want in zip(img.size, size)), (path, img.size, size)
        pixels = np.asarray(img.convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours >= min_colours and pixels.std() > 5, f"{path} looks blank ({colours} colours)"
    return pixels


def draw_face(rng: np.random.Generator, size: int = 128) -> Image.Image:
    """A face-like picture: an oval of skin on a plain background, two eyes and a mouth."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    cx, cy = (size // 2 + rng.integers(-4, 5, 2)).tolist()
    r = int(rng.integers(size // 4, size // 3))
    draw.ellipse([cx - r, cy - 1.2 * r, cx + r, cy + 1.2 * r],
                 fill=(int(rng.integers(150, 240)), int(rng.integers(100, 180)), int(rng.integers(60, 120))))
    for dx in (-r // 2.5, r // 2.5):
        draw.ellipse([cx + dx - 5, cy - 14, cx + dx + 5, cy - 4], fill=(30, 30, 30))
    draw.rectangle([cx - r // 3, cy + r // 2.6, cx + r // 3, cy + r // 2.6 + 4], fill=(120, 30, 30))
    return img


def make_faces(folder: Path, n: int, seed: int = 0) -> Path:
    """n face-like JPEGs in per-person sub-folders, like the LFW layout."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        person = folder / f"Person_{i % 4}"
        person.mkdir(parents=True, exist_ok=True)
        draw_face(rng).save(person / f"Person_{i % 4}_{i:04d}.jpg")
    return folder
