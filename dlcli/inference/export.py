"""`dlcli export`: a run's model as TFLite or a SavedModel, with what is needed to use it.

The folder (by default `<run>/export/`) holds the model (`model.tflite`, or one file per part
of a task that runs several models: `encoder.tflite`, `decoder.tflite`), `export.json` (task,
run, the model file it came from with its size and modification time, each file's inputs,
output, preprocessing),
`classes.json` and `config.yaml`. `predict` uses a `.tflite` there through LiteRT, without
TensorFlow, as long as the run's model file is unchanged (see `dlcli.inference.lite`).

Models trained in mixed precision (cnn's bfloat16 on CPUs that have it) are exported in
float32: TFLite has no bfloat16 kernels, and float32 is the more exact of the two.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dlcli import __version__
from dlcli.inference import lite
from dlcli.errors import UsageError
from dlcli.engine.lazy import lazy_import
from dlcli.runs.files import atomic_write_json, atomic_write_text, fsync_file

keras = lazy_import("keras")
tf = lazy_import("tensorflow")

FORMATS = ("tflite", "savedmodel")

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


def exportable(spec) -> None:
    """Refuse a task without an export, naming those that have one."""
    if spec.export is None:
        from dlcli.tasks import TASK_NAMES, get_task

        can = [name for name in TASK_NAMES if get_task(name).export is not None]
        raise UsageError(f"task {spec.name} cannot be exported; these can: {', '.join(can)}")


def file_name(part: str, fmt: str, single: bool) -> str:
    """The file of a part: model.tflite / saved_model for a one-file export, else <part>.tflite
    / <part>_saved_model."""
    if fmt == "tflite":
        return f"{part}.tflite"
    return "saved_model" if single else f"{part}_saved_model"


def _write(model, target: Path, fmt: str) -> None:
    tmp = target.parent / f".{target.name}.tmp"
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


def _fixed_batch(model, batch: int):
    """The model behind inputs of a fixed batch size (the same layers and weights)."""
    inputs = [keras.Input(t.shape[1:], batch_size=batch, dtype=t.dtype, name=t.name) for t in model.inputs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0])
    return keras.Model(inputs, outputs, name=model.name)


def _shape(shape) -> list:
    return [None, *[None if d is None else int(d) for d in shape[1:]]]


def export(spec, run, model_file: Path, fmt: str, out: Path | None, classes: list | None, ctx=None) -> dict:
    """Write the export folder of a task (`spec.export` says what goes in it); returns export.json's content.

    `ctx` is handed to the pickers of a task that exports several parts (`ExportSpec.models`)."""
    exportable(spec)
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    from dlcli.engine import training

    task = spec.name
    stamp = lite.source_stamp(model_file)  # before loading: a later change makes the export stale
    loaded = training.load_model(model_file, task)
    parts = spec.export.pick(loaded, ctx)
    single = spec.export.models is None
    out = Path(out) if out is not None else run.file(lite.EXPORT_DIR)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file is there; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / lite.META).unlink(missing_ok=True)  # the folder is no export while its files change
    cfg = run.read_config() if run.config_path.exists() else {}
    files, precisions = {}, []
    for part, model in parts.items():
        model, precision = _float32(model)
        if spec.export.batch and fmt == "tflite":
            model = _fixed_batch(model, spec.export.batch)
        precisions.append(precision)
        name = file_name(part, fmt, single)
        _write(model, out / name, fmt)
        files[part] = {"file": name, "inputs": [t.name for t in model.inputs],
                       "input_shapes": [_shape(t.shape) for t in model.inputs],
                       "outputs": len(model.outputs), "batch": spec.export.batch if fmt == "tflite" else None}
    first = next(iter(files.values()))
    meta = {
        "task": task, "run": run.name, "format": fmt, "file": first["file"],
        "source": str(Path(model_file).resolve()), "source_stamp": stamp,
        "input_shape": first["input_shapes"][0], "files": files,
        "output": spec.export.output,
        # where the Keras model computes in mixed precision, the float32 export does not give
        # its outputs to 1e-4, so `predict` uses it only when asked (--engine lite)
        "keras_precision": next((p for p in precisions if p != "float32"), "float32"), "precision": "float32",
        "preprocessing": spec.export.preprocessing(cfg), "dlcli_version": __version__, "tensorflow_version": tf.__version__,
    }
    if classes is not None:
        atomic_write_json(out / "classes.json", classes)
    if cfg:
        atomic_write_text(out / "config.yaml", run.config_path.read_text())
    for extra in spec.export.files:
        if run.file(extra).exists() and run.file(extra).resolve() != (out / extra).resolve():
            atomic_write_text(out / extra, run.file(extra).read_text(encoding="utf-8"))
    atomic_write_json(out / lite.META, meta)  # last: the export is complete once it is there
    return meta
