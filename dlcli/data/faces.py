"""Face photos for the `autoencoder` and `gan` tasks: load, crop, resize, split.

`--dataset lfw` (tensorflow-datasets) or `folder:PATH`, any folder of photos searched
recursively (sub-folders allowed; a photo's folder names its person, as in LFW's layout). Every photo goes through the course's
preprocessing: the central `crop` x `crop` pixels (90 by default: the course's 80 px
off each side of a 250x250 LFW photo; the same 90 px sit in the middle of the shared
128x128 crops, so one number serves both), then a resize to `image_size`. A photo smaller
than `crop` keeps its central square; `crop: 0` keeps the whole central square.

The train/validation split is drawn from the seed and written to the run as
`split.json`, so eval, predict and the views use the same held-out faces later. With
`split: person` it holds out whole people (every photo of a held-out person, none of them
in training), so the validation error is the error on faces of people the model never saw;
`split: photo` holds out photos at random. A config without the key (the gan's) splits by photo.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dlcli.data import sources as data_lib
from dlcli.errors import UsageError
from dlcli.data.images import read_image
from dlcli.runs.files import atomic_write_json

SPLIT_FILE = "split.json"


def face_defaults(image_size: int) -> dict:
    """The data keys both face tasks share."""
    return {"image_size": image_size, "crop": 90, "val_fraction": 0.1, "limit": 0}


def preprocess(image: np.ndarray, crop: int, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> the central crop x crop square resized to size x size, uint8."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w) if crop <= 0 else min(crop, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top: top + side, left: left + side]
    if side != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.LANCZOS))
    return square


def read_face(path: str | Path, cfg: dict) -> np.ndarray:
    """One user photo, preprocessed like the training data (UsageError if unreadable)."""
    return preprocess(read_image(path, mode="RGB"), cfg["crop"], cfg["image_size"])


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, recursively, in a fixed (sorted) order."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{folder}: no such folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in data_lib.IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{folder} holds no images ({', '.join(data_lib.IMAGE_SUFFIXES)})")
    return files


def read_faces(paths: list[Path], cfg: dict) -> np.ndarray:
    """Read and preprocess many photos in a few threads (Pillow decodes without the GIL)."""
    with ThreadPoolExecutor(4) as pool:
        faces = list(pool.map(lambda p: read_face(p, cfg), paths))
    size = cfg["image_size"]
    return np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)


def _tfds_faces(name: str, cfg: dict) -> tuple[list[str], np.ndarray, list[str] | None]:
    builder = data_lib.tfds_builder(name, cfg["data_dir"])
    split = data_lib.pick_split(list(builder.info.splits.keys()), ("train",), name)
    faces, ids, people = [], [], []
    for i, example in enumerate(builder.as_dataset(split=split).as_numpy_iterator()):
        if cfg["limit"] and i >= cfg["limit"]:
            break
        faces.append(preprocess(example["image"], cfg["crop"], cfg["image_size"]))
        ids.append(f"{name}:{i}")
        label = example.get("label")  # lfw's: the person's name, as text (a number would be a class)
        people.append(label.decode("utf-8", "replace") if isinstance(label, bytes) else label if isinstance(label, str) else None)
    return ids, np.stack(faces), None if None in people else people


def load_faces_and_people(cfg: dict) -> tuple[list[str], np.ndarray, list[str] | None]:
    """(ids, uint8 faces (N, size, size, 3), the person of each face or None) in a fixed order.

    A folder's person is the sub-folder holding the photo (LFW's `<Person_Name>/`); tfds's is
    the text `label` feature (lfw's person). None where some face has no person (a photo at the top
    of the folder, a data set without labels).
    """
    kind, value = data_lib.parse_dataset(cfg["dataset"], allowed=("tfds", "folder"))
    if kind == "tfds":
        return _tfds_faces(value, cfg)
    files = list_images(value)
    if cfg["limit"]:
        files = files[: cfg["limit"]]
    ids = [str(p.relative_to(value)) for p in files]
    people = [Path(i).parent.as_posix() for i in ids]
    return ids, read_faces(files, cfg), None if "." in people else people


def load_faces(cfg: dict) -> tuple[list[str], np.ndarray]:
    """(ids, uint8 faces (N, size, size, 3)) of the configured data set, in a fixed order."""
    ids, x, _ = load_faces_and_people(cfg)
    return ids, x


def split_people(people: list[str], fraction: float, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices holding out whole people, drawn from the seed.

    People are drawn in a seeded order and held out while their photos fit in the photo
    split's share (the first drawn always), so the validation set is as large as the photo
    split's wherever the counts allow, and no person is on both sides.
    """
    if not 0 < fraction < 1:
        raise UsageError(f"val_fraction must be between 0 and 1, got {fraction}")
    names, person = np.unique(np.array(people, dtype=str), return_inverse=True)
    if len(names) < 2:
        raise UsageError("one person is too few to split by person into training and validation")
    counts = np.bincount(person, minlength=len(names))
    target = max(1, int(round(len(people) * fraction)))
    held = np.zeros(len(names), bool)
    taken = 0
    for j in np.random.default_rng(seed).permutation(len(names)):
        if taken == 0 or taken + counts[j] <= target:
            held[j] = True
            taken += counts[j]
        if taken >= target:
            break
    val = held[person]
    return np.flatnonzero(~val), np.flatnonzero(val)


def split_ids(ids: list[str], fraction: float, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: a permutation drawn from the seed."""
    if not 0 < fraction < 1:
        raise UsageError(f"val_fraction must be between 0 and 1, got {fraction}")
    n_val = max(1, int(round(len(ids) * fraction)))
    if len(ids) - n_val < 1:
        raise UsageError(f"{len(ids)} faces are too few to split into training and validation")
    order = np.random.default_rng(seed).permutation(len(ids))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _dataset_key(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("dataset", "crop", "image_size", "limit")}


def draw_split(ids: list[str], people: list[str] | None, cfg: dict, reporter=None) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, val, "person" or "photo"): by person where asked and the people are known."""
    if cfg.get("split", "photo") == "person":
        if people is not None and len(set(people)) >= 2:
            train, val = split_people(people, cfg["val_fraction"], cfg["seed"])
            if reporter is not None:
                reporter.info(f"holding out {len(val)} faces of {len(set(people[i] for i in val))} people "
                              f"(split: person; none of them in training)")
            return train, val, "person"
        if reporter is not None:
            why = ("all faces are of one person" if people is not None else
                   "the data names no person for some faces (a photo outside a sub-folder, or no text label)")
            reporter.info(f"holding out faces by photo, not by person: {why}")
    train, val = split_ids(ids, cfg["val_fraction"], cfg["seed"])
    return train, val, "photo"


def load_split(cfg: dict, run, reporter=None) -> dict:
    """train/val faces of the run: its saved split where it matches the data, else a new one
    (saved when the run has none; `reporter` hears how it was drawn)."""
    if cfg.get("split", "photo") == "person":
        ids, faces, people = load_faces_and_people(cfg)
    else:
        (ids, faces), people = load_faces(cfg), None
    saved_path = run.file(SPLIT_FILE)
    try:
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
    except (OSError, ValueError, RecursionError):
        raise UsageError(f"{saved_path} is corrupt (not JSON)") from None
    if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("data"), dict)
                                  and all(isinstance(saved.get(k), list) and all(isinstance(n, str) for n in saved[k])
                                          for k in ("train", "val"))):
        raise UsageError(f"{saved_path} is not a split of the faces (lists of train and val names)")
    if saved and saved.get("data") == _dataset_key(cfg):
        index = {name: i for i, name in enumerate(ids)}
        missing = [n for n in saved["val"] + saved["train"] if n not in index]
        if missing:
            raise UsageError(f"{cfg['dataset']} lacks {len(missing)} faces of the run's split, e.g. {missing[0]}")
        train = np.array([index[n] for n in saved["train"]], dtype=np.int64)
        val = np.array([index[n] for n in saved["val"]], dtype=np.int64)
    else:
        train, val, kind = draw_split(ids, people, cfg, reporter)
        if saved is None:
            atomic_write_json(saved_path, {
                "data": _dataset_key(cfg), "seed": cfg["seed"], "split": kind,
                "train": [ids[i] for i in train], "val": [ids[i] for i in val],
            })
    return {"x_train": faces[train], "x_val": faces[val],
            "train_ids": [ids[i] for i in train], "val_ids": [ids[i] for i in val]}


def eval_faces(cfg: dict, run, other_data: bool, reporter=None) -> tuple[np.ndarray, str]:
    """(faces, metric prefix) that `eval` scores.

    On the run's own data: its held-out faces, prefix "val_". On other data (`eval --dataset
    OTHER`, see `Context.on_other_data`): every face of it, prefix "" -- the run's seed has
    nothing to hold out there, and the run's `limit` (a cap on its training data) does not
    apply either.
    """
    if not other_data:
        return load_split(cfg, run)["x_val"], "val_"
    _, x = load_faces({**cfg, "limit": 0})
    if reporter is not None:
        reporter.info(f"evaluating all {len(x)} faces of {cfg['dataset']} (not the run's training data)")
    return x, ""


def folder_fingerprint(files: list[Path]) -> str:
    """A hash of names, sizes and times: a cached index is reused only for the same files."""
    digest = hashlib.sha1()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def save_png(image: np.ndarray, path: Path, scale: int = 1) -> Path:
    """A uint8 image as PNG (optionally enlarged, nearest neighbour, so pixels stay visible)."""
    return save_pngs({Path(path): image}, scale)[0]


def save_pngs(images: dict, scale: int = 1) -> list[Path]:
    """uint8 images as PNG files (path -> image), written together (`atomic_write_all`)."""
    from PIL import Image

    from dlcli.runs.files import atomic_write_all

    def writer(image):
        pic = Image.fromarray(np.asarray(image, np.uint8))
        if scale > 1:
            pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
        return lambda tmp: pic.save(tmp, format="PNG", compress_level=1)  # small files: fast beats small

    return atomic_write_all({Path(path): writer(image) for path, image in images.items()})


def tile(images: np.ndarray, cols: int, gap: int = 2) -> np.ndarray:
    """uint8 images (N, H, W, 3) as one picture, `cols` a row, `gap` white pixels between them."""
    n, h, w = images.shape[:3]
    rows = -(-n // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = img
    return out


def to_uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Floats on [low, high] -> uint8 pixels (clipped)."""
    return np.clip((np.asarray(x, np.float32) - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)
