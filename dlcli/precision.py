"""Numeric precision of a Keras task's layers (`--set precision=...`)."""

from __future__ import annotations

import contextlib

from dlcli.lazy import lazy_import

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def cpu_has_bfloat16() -> bool:
    """Whether this x86 CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@contextlib.contextmanager
def precision(name: str):
    """Build layers under a Keras dtype policy (`auto`: mixed_bfloat16 on a CPU-only machine
    whose CPU has bfloat16 instructions, float32 elsewhere). The policy is saved with each
    layer, so a loaded model computes as it was trained; the global policy is restored."""
    if name == "auto":
        name = "mixed_bfloat16" if not tf.config.list_physical_devices("GPU") and cpu_has_bfloat16() else "float32"
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(before)
