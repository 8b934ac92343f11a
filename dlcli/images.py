"""Reading user images for `predict`: any format Pillow knows, one clear error per bad file."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from dlcli.errors import UsageError


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """The image as a uint8 array (H, W, 3) for RGB or (H, W) for "L"."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:  # open first and ask why only when it fails: one system call per good file, not four
        fh = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not an image") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    try:
        with fh, Image.open(fh) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img if img.mode == mode else img.convert(mode))
    except UnidentifiedImageError:
        if path.stat().st_size == 0:
            raise UsageError(f"{path}: empty file") from None
        raise UsageError(f"{path}: not an image (or an unsupported format)") from None
    except Image.DecompressionBombError:
        raise UsageError(f"{path}: the image is too large to read (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except MemoryError:
        raise UsageError(f"{path}: the image is too large to read (out of memory)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UsageError(f"{path}: cannot read image ({exc})") from None


def read_many(paths: Iterable[str], read: Callable[[str], np.ndarray]) -> tuple[list, list, list[dict]]:
    """Read every path, in parallel threads (Pillow decodes without the GIL), keeping order.

    Returns (good paths, arrays, failures as {"input", "error"} rows).
    """

    def attempt(path):
        try:
            return path, read(path), None
        except UsageError as exc:
            return path, None, str(exc)
        except Exception as exc:  # one bad input never costs the others their prediction
            return path, None, f"{path}: cannot use this image ({type(exc).__name__}: {exc})"

    good, arrays, failures = [], [], []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for path, array, error in pool.map(attempt, paths):
            if error is None:
                good.append(str(path))
                arrays.append(array)
            else:
                failures.append({"input": str(path), "error": error})
    return good, arrays, failures


def ranked_rows(paths: list[str], probs: np.ndarray, classes: list[str], k: int, key: str = "class") -> list[dict]:
    """One row per image: its best class and probability, and the k best where k > 1."""
    k = max(1, min(k, len(classes)))
    rows = []
    order = np.argsort(-np.asarray(probs), axis=1, kind="stable")[:, :k]  # one sort for the batch
    for path, p, top in zip(paths, probs, order):
        ranked = [{key: classes[i], "probability": round(float(p[i]), 4)} for i in top]
        row = {"input": path, **ranked[0]}
        if k > 1:
            row["top"] = ranked
            row["text"] = ", ".join(f"{r[key]} {r['probability']:.4f}" for r in ranked)
        rows.append(row)
    return rows


def in_input_order(inputs: Iterable[str], rows: list[dict]) -> list[dict]:
    """Results and failure rows back in the order the user gave the inputs."""
    order = {path: i for i, path in enumerate(map(str, inputs))}
    return sorted(rows, key=lambda r: order.get(r["input"], 0))
