"""Numeric precision of a Keras task's layers (`--set precision=...`)."""

from __future__ import annotations

import contextlib

from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def cpu_flags() -> set[str]:
    """The x86 CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return {flag for line in fh if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_has_amx() -> bool:
    """Whether this x86 CPU has AMX tiles for bfloat16 (what makes bfloat16 pay on a CPU).

    AVX512-BF16 alone does not: on such a Xeon (2026-11-26, AMX not exposed) bfloat16 ran the
    gan's training at 100-138 faces/s against 200-232 in float32, cnn's at 397-420 ex/s
    against 397-655 and its predict at 792-1,485 img/s against 1,547-2,196
    (`python benchmarks/engine_costs.py precision`, four interleaved rounds)."""
    return "amx_bf16" in cpu_flags()


@contextlib.contextmanager
def precision(name: str):
    """Build layers under a Keras dtype policy (`auto`: mixed_bfloat16 on a CPU-only machine
    whose CPU has AMX, float32 elsewhere). The policy is saved with each layer, so a loaded
    model computes as it was trained; the global policy is restored."""
    if name == "auto":
        name = "mixed_bfloat16" if not tf.config.list_physical_devices("GPU") and cpu_has_amx() else "float32"
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(before)
