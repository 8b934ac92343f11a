"""Where data comes from: tensorflow-datasets by name, or local files.

`--dataset` takes
    NAME or tfds:NAME   a tensorflow-datasets data set (`mnist`, `cifar10`, ...)
    folder:PATH         an image folder `PATH/<split>/<label>/<image>` (tfds ImageFolder)
    npz:PATH            arrays in the Keras `mnist.npz` layout (x_train, y_train, x_test, y_test)
    text:PATH           one item per line

A data set that is not prepared locally is downloaded by tensorflow-datasets, but only
after a quick check that the network answers: offline, the user gets a clear message in
a second instead of minutes of retries.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np

from dlcli.errors import RunError, UsageError
from dlcli.data.files import NotRegularFile, check_regular
from dlcli.engine.lazy import lazy_import

tf = lazy_import("tensorflow")
tfds = lazy_import("tensorflow_datasets")

def unit_float(pixels: np.ndarray, minus: float = 0.0) -> np.ndarray:
    """uint8 pixels -> float32 pixels / 255 - `minus`, computed in place in one new array.

    `x.astype("float32") / 255.0` makes a second array as large as the first, and touching
    fresh memory that size cost up to 0.5 s for mnist's 48,000 training digits (150 MB); the
    values are the same to the bit.
    """
    out = pixels.astype(np.float32)
    out /= np.float32(255.0)
    if minus:
        out -= np.float32(minus)
    return out


KINDS = ("tfds", "folder", "npz", "text", "captions")
# Where tensorflow-datasets fetches from; DLCLI_NETWORK_PROBE=host:port overrides it.
NETWORK_PROBE = "storage.googleapis.com:443"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def split_spec(spec: str) -> tuple[str, str]:
    """`folder:/data/x` -> ("folder", "/data/x"); a bare name is a tfds name. No checks."""
    kind, sep, value = str(spec).partition(":")
    return (kind, value) if sep else ("tfds", str(spec))


def parse_dataset(spec: str, allowed: tuple[str, ...] = KINDS) -> tuple[str, str]:
    """`folder:/data/x` -> ("folder", "/data/x"), checked: a known kind, allowed here, and an
    existing path."""
    kind, value = split_spec(spec)
    if kind not in KINDS or not value:
        raise UsageError(
            f"cannot read --dataset {spec!r}; use NAME (tensorflow-datasets) or one of "
            + ", ".join(f"{k}:PATH" for k in KINDS if k != "tfds")
        )
    if kind not in allowed:
        raise UsageError(
            f"this task cannot use --dataset {spec!r}; it takes "
            + ", ".join("NAME" if k == "tfds" else f"{k}:PATH" for k in allowed)
        )
    if kind != "tfds":
        path = Path(value).expanduser()
        if not path.exists():
            raise UsageError(f"--dataset {spec!r}: {path} does not exist")
        value = str(path)
    return kind, value


def check_dataset(task: str, spec: str, rules=None, training: bool = True) -> None:
    """Refuse a --dataset the task cannot read, before TensorFlow loads and before a run is made
    (`rules`: the task's `DataRules`, what its --dataset takes; None: nothing to check).

    What needs TensorFlow (a tensorflow-datasets name, the images themselves) is checked later
    by the task's loader; this catches the rest in milliseconds: a wrong kind, a missing or
    empty path, an npz that is not one or lacks arrays, a folder without images.
    """
    if rules is None or spec in rules.builtin:
        return
    kinds = [*(f"{b} (the default)" for b in rules.builtin),
             *("NAME" if k == "tfds" else f"{k}:PATH" for k in rules.kinds)]
    takes = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
    if "tfds" not in rules.kinds and split_spec(spec)[0] == "tfds":
        raise UsageError(f"task {task} cannot use --dataset {spec!r}; it takes {takes}")
    try:
        kind, value = parse_dataset(spec, allowed=rules.kinds)
    except UsageError as exc:
        if "this task cannot use" in str(exc):
            raise UsageError(f"task {task} cannot use --dataset {spec!r}; it takes {takes}") from None
        raise
    path = Path(value)
    if kind in ("npz", "text"):
        if path.is_dir():
            raise UsageError(f"--dataset {spec!r}: {path} is a directory; {kind}: takes a file")
        try:
            check_regular(path)  # a FIFO or a device would be waited on, or read without end
        except NotRegularFile as exc:
            raise UsageError(f"--dataset {spec!r}: {path} is {exc.kind}, not a regular file") from None
        if path.stat().st_size == 0:
            raise UsageError(f"--dataset {spec!r}: {path} is an empty file")
    if kind == "npz":
        files = npz_names(str(path))
        missing = [k for k in rules.npz_keys if k not in files] if training else []
        if missing:
            raise UsageError(f"{path} lacks the arrays {', '.join(missing)} (it has {', '.join(files) or 'none'})")
    if kind == "folder" and rules.labelled_folder:
        check_image_folder(str(path))
    elif kind == "folder":
        if not path.is_dir():
            raise UsageError(f"--dataset {spec!r}: {path} is not a folder")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            raise UsageError(f"--dataset {spec!r}: {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")


def npz_names(path: str) -> list[str]:
    """The array names in an .npz file, or a clear error if it is not one."""
    import zipfile

    if Path(path).stat().st_size == 0:
        raise UsageError(f"{path}: empty file")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path} is not an .npz file (NumPy's zip of arrays, as written by numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as an .npz file: {exc}") from None


def data_identity(spec, data_dir=None) -> tuple:
    """What a `--dataset` (and `--data-dir`) point at, for telling two settings apart: the
    resolved path for files and folders (`npz:./a.npz` is `npz:a.npz`); a tensorflow-datasets
    name with its data directory (the only kind `--data-dir` changes)."""
    kind, value = split_spec(spec)
    if kind == "tfds":
        return kind, value, str(Path(data_dir).expanduser().resolve()) if data_dir else None
    return kind, str(Path(value).expanduser().resolve())


def network_available(timeout: float = 3.0) -> bool:
    host, _, port = os.environ.get("DLCLI_NETWORK_PROBE", NETWORK_PROBE).rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def tfds_data_dir(data_dir: str | None) -> str | None:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def tfds_builder(name: str, data_dir: str | None = None):
    """A prepared tensorflow-datasets builder, downloading only if the network answers."""
    data_dir = tfds_data_dir(data_dir)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # its warnings on missing folders would come before our one clear line
    try:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as exc:  # tfds raises its own DatasetNotFoundError and friends
            raise UsageError(f"tensorflow-datasets has no data set {name!r}: {str(exc).splitlines()[0]}") from None
        prepared = builder.is_prepared()
    finally:
        absl.setLevel(level)
    if prepared:
        return builder
    where = builder.data_dir
    if not network_available():
        raise RunError(
            f"data set {name!r} is not prepared in {where} and the network is unreachable; "
            f"prepare it where there is internet (`tfds build {name}`) and copy it there "
            "(or point --data-dir / TFDS_DATA_DIR at it), or use local files with "
            "--dataset npz:PATH or folder:PATH"
        )
    try:
        builder.download_and_prepare()
    except Exception as exc:
        raise RunError(f"could not download data set {name!r}: {str(exc).splitlines()[0]}") from None
    return builder


def tfds_arrays(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A small supervised tfds split as two NumPy arrays (images, labels)."""
    builder = tfds_builder(name, data_dir)
    ds = builder.as_dataset(split=split, as_supervised=True, batch_size=-1)
    x, y = tfds.as_numpy(ds)
    return x, y


def load_npz(path: str, keys: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")) -> dict:
    """Arrays from an .npz file, refusing pickles and naming missing keys."""
    npz_names(path)  # an empty file or not a zip: say so, not NumPy's advice on pickles
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise UsageError(
                    f"{path} lacks the arrays {', '.join(missing)} "
                    f"(it has {', '.join(data.files) or 'none'})"
                )
            return {k: data[k] for k in data.files}
    except UsageError:
        raise
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} as an .npz file: {exc}") from None


def image_folder(path: str):
    """The tfds ImageFolder builder of `path/<split>/<label>/<image>`."""
    check_image_folder(path)
    return tfds.folder_dataset.ImageFolder(str(Path(path)))


def check_image_folder(path: str) -> None:
    """Refuse a folder that is not `path/<split>/<label>/<image>` (needs no TensorFlow)."""
    root = Path(path)
    splits = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    if not splits or not any(
        f.suffix.lower() in IMAGE_SUFFIXES for s in splits for d in s.iterdir() if d.is_dir() for f in d.iterdir()
    ):
        raise UsageError(
            f"{path} is not an image folder: expected {path}/<split>/<label>/<image>.jpg "
            "(for example train/cat/0001.jpg)"
        )


def folder_splits(path: str):
    """An image folder's builder with its training split and its test split (test, else val)."""
    builder = image_folder(path)
    splits = list(builder.info.splits.keys())
    return (builder, pick_split(splits, ("train",), path),
            pick_split(splits, ("test", "val", "validation"), path))


def pick_split(available, wanted: tuple[str, ...], what: str) -> str:
    for name in wanted:
        if name in available:
            return name
    raise UsageError(f"{what} has no split named {' or '.join(wanted)} (it has {', '.join(available)})")


def held_out_count(val_size: int, n: int, say=None, minimum: int = 0) -> int:
    """How many of `n` training examples `val_size` holds out: at most a fifth of them (the
    default suits the full data set, and a small one of your own must keep most for training),
    and `say` is told where that cuts it."""
    cap = max(minimum, n // 5)
    if val_size > cap:
        if say is not None:
            say(f"holding out {cap} of the {n} training examples for validation, not val_size {val_size} "
                "(at most a fifth of them)")
        return cap
    return max(val_size, minimum)


TEST_SPLITS = ("test", "val", "validation")


def eval_splits(available) -> tuple[list[str], bool]:
    """The splits `eval --dataset OTHER` scores: ([its test split], True) where it has one
    (test, else val or validation), else (every split, False): all of it."""
    for name in TEST_SPLITS:
        if name in available:
            return [name], True
    return list(available), False


def relabel(y: np.ndarray, names: list[str] | None, classes: list[str], what: str) -> np.ndarray:
    """Labels of other data -> the run's class indices, matched by class name (an image folder
    of 2 of the run's 10 classes numbers them 0 and 1); integer labels without names must lie
    in range."""
    y = np.asarray(y).astype(np.int64).ravel()
    if names is None:
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise UsageError(f"{what} has labels {y.min()}-{y.max()}; the model has {len(classes)} classes")
        return y
    used = [names[i] for i in np.unique(y)]
    unknown = [n for n in used if n not in classes]
    if unknown:
        raise UsageError(f"{what} has classes the model never learnt: {', '.join(unknown)} "
                         f"(its classes: {', '.join(classes)})")
    return np.array([classes.index(n) if n in classes else -1 for n in names], np.int64)[y]
