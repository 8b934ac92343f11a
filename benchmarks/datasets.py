"""Benchmark data: taken from the shared data folder where it exists, else generated.

The shared folder comes from `--data DIR` or `$DLCLI_SHARED_DATA` (never a fixed path).
Everything is written to a temporary directory; image folders are symbolic links.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np

SIZES = {  # examples per epoch: quick / full
    "mnist": (10_000, 50_000),
    "names": (8_000, 0),  # 0: the whole file
    "cnn": (1_280, 4_000),
}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _random_image(path: Path, size: int, rng, gray: bool = False) -> None:
    from PIL import Image

    shape = (size, size) if gray else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def mnist_npz(out: Path, shared: Path | None, n_train: int, n_val: int) -> Path:
    src = shared / "mnist" / "mnist.npz" if shared else None
    if src and src.exists():
        with np.load(src) as d:
            x, y, xt, yt = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8), rng.integers(0, 10, 60000)
        xt, yt = x[:1000], y[:1000]
    n = min(n_train + n_val, len(x))
    path = out / "mnist.npz"
    np.savez(path, x_train=x[:n], y_train=y[:n], x_test=xt[:2000], y_test=yt[:2000])
    return path


def mnist_images(out: Path, npz: Path, n: int = 1000) -> list[str]:
    from PIL import Image

    folder = out / "mnist-png"
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(npz) as d:
        x = d["x_test"]
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
        Image.fromarray(x[i % len(x)]).save(p)
        paths.append(str(p))
    return paths


def names_text(out: Path, shared: Path | None, n: int) -> Path:
    src = shared / "names" / "ssa_names.txt" if shared else None
    if src and src.exists():
        lines = [l.strip() for l in src.read_text(encoding="utf-8").splitlines() if l.strip()]
    else:
        rng = random.Random(0)
        letters = "abcdefghijklmnopqrstuvwxyz"
        lines = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(40000)})
    if n:
        lines = lines[:n]
    path = out / "names.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def image_folder(out: Path, name: str, shared_folder: Path | None, n_train: int, n_test: int,
                 size: int = 32, splits=("train", "test")) -> Path:
    """out/name/<split>/<class>/*.jpg with about n images a split, classes balanced."""
    root = out / name
    rng = np.random.default_rng(0)
    for split, n in zip(splits, (n_train, n_test)):
        src = shared_folder / split if shared_folder else None
        if src and src.is_dir():
            classes = sorted(d for d in src.iterdir() if d.is_dir())
            per = max(1, -(-n // len(classes)))
            for c in classes:
                for f in sorted(c.iterdir())[:per]:
                    _link(f, root / split / c.name / f.name)
        else:
            for i in range(n):
                d = root / split / f"class{i % 10}"
                d.mkdir(parents=True, exist_ok=True)
                _random_image(d / f"{i:05d}.jpg", size, rng)
    return root


def flat_images(folder: Path, n: int) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [str(files[i % len(files)]) for i in range(n)] if files else []


def faces_folder(out: Path, shared: Path | None, n: int) -> Path:
    root = out / "faces"
    src = shared / "lfw" if shared else None
    if src and src.is_dir():
        files = sorted(src.rglob("*.jpg"))[:n]
        for f in files:
            _link(f, root / f.parent.name / f.name)
    else:
        rng = np.random.default_rng(0)
        (root / "x").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _random_image(root / "x" / f"{i:05d}.jpg", 128, rng)
    return root


def captions_folder(out: Path, shared: Path | None, n_images: int) -> Path | None:
    src = shared / "flickr8k" if shared else None
    if not (src and (src / "captions.txt").exists()):
        return None
    import csv

    root = out / "captions"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, keep = [], []
    with open(src / "captions.txt", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["image"] not in keep:
                if len(keep) >= n_images:
                    continue
                keep.append(row["image"])
            rows.append(row)
    for name in keep:
        _link(src / "images" / name, root / "images" / name)
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "caption"])
        w.writeheader()
        for row in rows:
            w.writerow({"image": row["image"], "caption": row["caption"]})
    return root
