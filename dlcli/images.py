"""Reading user images for `predict`: any format Pillow knows, one clear error per bad file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from dlcli.errors import UsageError


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """The image as a uint8 array (H, W, 3) for RGB or (H, W) for "L"."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not an image")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img.convert(mode))
    except UnidentifiedImageError:
        raise UsageError(f"{path}: not an image (or an unsupported format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UsageError(f"{path}: cannot read image ({exc})") from None


def read_many(paths: Iterable[str], read: Callable[[str], np.ndarray]) -> tuple[list, list, list[dict]]:
    """Read every path; return (good paths, arrays, failures as {"input", "error"} rows)."""
    good, arrays, failures = [], [], []
    for path in paths:
        try:
            arrays.append(read(path))
            good.append(str(path))
        except UsageError as exc:
            failures.append({"input": str(path), "error": str(exc)})
    return good, arrays, failures
