"""`dlcli export`: a run's model as TFLite or a SavedModel, with what is needed to use it.

The folder (by default `<run>/export/`) holds the model, `export.json` (task, run, the model
file it came from with its size and modification time, input shape, output, preprocessing),
`classes.json` and `config.yaml`. `predict` uses a `.tflite` there through LiteRT, without
TensorFlow, as long as the run's model file is unchanged (see `dlcli.lite`).

Models trained in mixed precision (cnn's bfloat16 on CPUs that have it) are exported in
float32: TFLite has no bfloat16 kernels, and float32 is the more exact of the two.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dlcli import __version__, lite
from dlcli.errors import UsageError
from dlcli.lazy import lazy_import
from dlcli.runs import atomic_write_json, atomic_write_text, fsync_file

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

FORMATS = ("tflite", "savedmodel")
EXPORTABLE = ("mnist", "cnn", "finetune", "autoencoder")


def preprocessing(task: str, cfg: dict) -> dict:
    """What a user of the exported model must do to an image before it, in words and numbers."""
    if task == "mnist":
        return {"input": "grey image of any size", "steps": [
            "invert if the border is light (dark digit on light paper)", "subtract the border's median, clip at 0",
            "divide by the maximum", "crop to the pixels above 0.2", "resize the longer side to 20 (Lanczos)",
            "paste in the middle of 28x28", "shift the centre of mass to (13.5, 13.5)"],
            "code": "dlcli.tasks.mnist.mnist_batch", "shape": [28, 28], "range": [0.0, 1.0]}
    if task == "cnn":
        return {"input": "RGB image of any size", "steps": ["resize the whole image to 32x32 (Lanczos)", "x / 255 - 0.5"],
                "code": "dlcli.tasks.cnn.to_input", "shape": [32, 32, 3], "scale": 1 / 255, "offset": -0.5,
                "tta": bool(cfg.get("tta")), "tta_means": "average the probabilities of the image and its mirror image"}
    if task == "finetune":
        from dlcli import backbones

        size = cfg["image_size"]
        return {"input": "RGB image of any size", "steps": [
            "the centred square", f"resize to {size}x{size} (bilinear, antialiased)",
            f"{backbones.NUMPY_MODES[cfg['backbone']]} scaling (see mode)"],
            "code": "dlcli.backbones.centre_crop_numpy + preprocess_numpy", "shape": [size, size, 3],
            "mode": backbones.NUMPY_MODES[cfg["backbone"]], "tta": bool(cfg.get("tta")),
            "tta_means": "average the probabilities of the image and its mirror image"}
    size, crop = cfg["image_size"], cfg["crop"]
    return {"input": "RGB face photo", "steps": [
        f"the centred square of side {crop if crop > 0 else 'min(height, width)'}", f"resize to {size}x{size} (Lanczos)",
        "x / 255 - 0.5"], "code": "dlcli.faces.preprocess + dlcli.tasks.autoencoder.scale",
        "shape": [size, size, 3], "scale": 1 / 255, "offset": -0.5, "output": "the encoder's code"}


def _float32(model):
    """(the model with every mixed-precision layer computing in float32 (same weights), the
    precision the Keras model computes in)."""
    text = json.dumps(keras.saving.serialize_keras_object(model))
    mixed = [p for p in ("mixed_bfloat16", "mixed_float16") if f'"{p}"' in text]
    if not mixed:
        return model, "float32"
    for policy in mixed:
        text = text.replace(f'"{policy}"', '"float32"')
    clone = keras.saving.deserialize_keras_object(json.loads(text))
    clone.set_weights(model.get_weights())
    return clone, mixed[0]


def _tflite(model, path: Path) -> None:
    import contextlib
    import io

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the SavedModel it passes through
        data = converter.convert()
    with open(path, "wb") as fh:
        fh.write(data)
    fsync_file(path)


def export(task: str, run, model_file: Path, fmt: str, out: Path | None, classes: list | None) -> dict:
    """Write the export folder; returns export.json's content."""
    if task not in EXPORTABLE:
        raise UsageError(f"task {task} cannot be exported; these can: {', '.join(EXPORTABLE)}")
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    from dlcli import training

    stamp = lite.source_stamp(model_file)  # before loading: a later change makes the export stale
    model = training.load_model(model_file, task)
    if task == "autoencoder":
        model = model.get_layer("encoder")
    model, precision = _float32(model)
    out = Path(out) if out is not None else run.path(lite.EXPORT_DIR)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file is there; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    cfg = run.read_config() if run.config_path.exists() else {}
    name = "model.tflite" if fmt == "tflite" else "saved_model"
    target = out / name
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    try:
        if fmt == "tflite":
            _tflite(model, tmp)
        else:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):
                model.export(str(tmp), format="tf_saved_model", verbose=False)
        if target.is_dir():
            shutil.rmtree(target)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    meta = {
        "task": task, "run": run.name, "format": fmt, "file": name,
        "source": str(Path(model_file).resolve()), "source_stamp": stamp,
        "input_shape": [None, *[int(d) for d in model.input_shape[1:]]],
        "output": "the encoder's code" if task == "autoencoder" else "class probabilities (softmax)",
        # where the Keras model computes in mixed precision, the float32 export does not give
        # its probabilities to 1e-4, so `predict` uses it only when asked (--engine lite)
        "keras_precision": precision, "precision": "float32",
        "preprocessing": preprocessing(task, cfg), "dlcli_version": __version__, "tensorflow_version": tf.__version__,
    }
    if classes is not None:
        atomic_write_json(out / "classes.json", classes)
    if cfg:
        atomic_write_text(out / "config.yaml", run.config_path.read_text())
    atomic_write_json(out / lite.META, meta)  # last: the export is complete once it is there
    return meta
