"""Reading user images for `predict`: any format Pillow knows, one clear error per bad file."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from dlcli.errors import UsageError
from dlcli.data.files import NotRegularFile, open_regular


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # colour type -> mode, 8 bits a sample
# Chunks whose presence changes the pixels Pillow gives (a palette, a transparent colour, an
# animation): such files take Pillow's whole path.
_PNG_PIXEL_CHUNKS = (b"PLTE", b"tRNS", b"acTL")


def _plain_png(data: bytes):
    """A non-interlaced 8-bit grey/RGB(A) PNG decoded by Pillow's own PNG (zip) decoder, without
    `Image.open`'s format detection and chunk parsing in Python, which cost two thirds of a
    small file's time (a 28x28 digit: 24 us instead of 56). None where the file is anything
    else (or broken: the caller's Pillow path then gives Pillow's answer and its error). The
    checks Pillow makes stay: every chunk's CRC but the pixel data's, the pixel-count limit."""
    import struct
    import zlib

    from PIL import Image

    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, pixels, header = 8, [], None
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if pos + 12 + length > len(data):  # cut short: Pillow says how
            return None
        body = data[pos + 8: pos + 8 + length]
        if kind == b"IDAT":
            pixels.append(body)
        else:
            if struct.unpack_from(">I", data, pos + 8 + length)[0] != zlib.crc32(kind + body) or kind in _PNG_PIXEL_CHUNKS:
                return None
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body) if length == 13 else None
            elif kind == b"IEND":
                break
        pos += 12 + length
    if header is None or not pixels:
        return None
    width, height, depth, colour, _, _, interlaced = header
    if depth != 8 or interlaced or colour not in _PNG_MODES or not 0 < width * height <= Image.MAX_IMAGE_PIXELS:
        return None
    try:
        return Image.frombytes(_PNG_MODES[colour], (width, height), b"".join(pixels), "zip", _PNG_MODES[colour])
    except Exception:  # noqa: BLE001 - whatever it is, Pillow's whole path reads the file again and names it
        return None


class ImageBytes(str):
    """An image file's bytes under a name: the name is the string (what a prediction row's
    `input` says), the bytes are `data`. `read_image` reads them as it reads a file, with the
    same limits, so an input that arrived over the network needs no temporary file."""

    data: bytes

    def __new__(cls, name: str, data: bytes):
        self = super().__new__(cls, name)
        self.data = bytes(data)
        return self


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """The image as a uint8 array (H, W, 3) for RGB or (H, W) for "L"; `path` may be an
    `ImageBytes`."""
    from PIL import Image, UnidentifiedImageError

    try:  # open first and ask why only when it fails: two system calls per good file, not four
        # (open_regular never waits on a FIFO, never reads a device)
        fh = io.BytesIO(path.data) if isinstance(path, ImageBytes) else open_regular(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not an image") from None
    except NotRegularFile as exc:
        raise UsageError(f"{path}: not a regular file ({exc.kind})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    try:
        with fh:
            head = fh.read(8)
            img = _plain_png(head + fh.read()) if head == _PNG_SIGNATURE else None
            if img is None:
                fh.seek(0)
                img = Image.open(fh)
                img.load()
        with img:
            if img.mode in ("RGBA", "LA", "P") and mode == "RGB":
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img if img.mode == mode else img.convert(mode))
    except UnidentifiedImageError:
        if (len(path.data) if isinstance(path, ImageBytes) else os.stat(path).st_size) == 0:
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
            return path, None, f"{path}: cannot use this image ({exc or 'no reason given'})"

    good, arrays, failures = [], [], []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for path, array, error in pool.map(attempt, paths):
            if error is None:
                good.append(str(path))
                arrays.append(array)
            else:
                failures.append({"input": str(path), "error": error})
    return good, arrays, failures


def check_class_count(classes: list[str], count: int) -> None:
    """Refuse class names that do not name each of the model's `count` outputs (a run's
    classes.json edited or of another model): exit 2, naming the file."""
    if hasattr(classes, "check_count"):
        classes.check_count(count)
    elif len(classes) != count:
        raise UsageError(f"the class names are {len(classes)}, the model's outputs {count}")


def ranked_rows(paths: list[str], probs: np.ndarray, classes: list[str], k: int, key: str = "class") -> list[dict]:
    """One row per image: its best class and probability, and the k best where k > 1."""
    probs = np.asarray(probs)
    check_class_count(classes, probs.shape[-1])
    k = max(1, min(k, len(classes)))
    rows = []
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # one sort for the batch
    best = np.take_along_axis(probs, order, axis=1).astype(np.float64).tolist()  # Python floats, at once
    for path, p, top in zip(paths, best, order.tolist()):
        ranked = [{key: classes[i], "probability": round(q, 4)} for i, q in zip(top, p)]
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
