"""Import heavy libraries on first use, so `dlcli --help` never pays for TensorFlow.

Task modules write `keras = lazy_import("keras")` at the top and then use `keras`
as usual; the real import happens at the first attribute access. That first access also
installs the process-wide Keras workarounds (`keras_workarounds`), so every Keras call dlcli
makes has them.

Example:
    >>> np_ = lazy_import("numpy")
    >>> np_.zeros(2).shape
    (2,)
"""

import importlib
import os
import sys
import types


_TENSORFLOW = ("tensorflow", "keras", "tensorflow_datasets")


_keras_ready = False


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr):
        if self.__name__ in _TENSORFLOW and "tensorflow" not in sys.modules:
            import_tensorflow_quietly()
        module = importlib.import_module(self.__name__)
        if self.__name__ == "keras" and not _keras_ready:
            _prepare_keras()
        return getattr(module, attr)


def _prepare_keras() -> None:
    """At dlcli's first use of Keras in a process: the workarounds that apply process-wide
    (Keras's data sets of arrays without tf.data's autotuner, saving's skip sets built once;
    see `keras_workarounds`)."""
    global _keras_ready
    _keras_ready = True
    from dlcli.engine.keras_workarounds import array_data_without_autotune, cached_attr_skipsets

    array_data_without_autotune()
    cached_attr_skipsets()


def lazy_import(name: str) -> types.ModuleType:
    return _LazyModule(name)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up lines (oneDNN, CUDA probing) kept off stderr.

    TensorFlow 2.21 prints them through absl before any log level applies, so the only
    way to hide them is to point file descriptor 2 elsewhere during the import.
    """
    quiet_tensorflow()
    if sys.stderr is not None:  # None: Python started with stderr closed
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # fd 2 closed: nothing to keep quiet
        importlib.import_module("tensorflow")
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                importlib.import_module("tensorflow")
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter out of the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
