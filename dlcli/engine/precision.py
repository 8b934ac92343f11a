"""Numeric precision of a Keras task's layers (`--set precision=...`)."""

from __future__ import annotations

import contextlib

from dlcli.engine.lazy import lazy_import

keras = lazy_import("keras")
tf = lazy_import("tensorflow")


PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields, name -> value (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO) as fh:
            for line in fh:
                if not line.strip():  # the first processor's block ends here
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _flags(info: dict[str, str]) -> set[str]:
    return set(info.get("flags", "").split())


def cpu_flags() -> set[str]:
    """The x86 CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return _flags(_cpuinfo())


AMX_FLAG = "amx_bf16"  # AMX tiles for bfloat16


def cpu_has_amx() -> bool:
    """Whether this x86 CPU has AMX tiles for bfloat16."""
    return AMX_FLAG in cpu_flags()


def bfloat16_pays() -> bool:
    """Whether this CPU trains and predicts faster in bfloat16 than in float32: one with AMX,
    or an AMD one with AVX512-BF16. Measured with `python benchmarks/engine_costs.py
    precision` (four interleaved rounds, float32 against mixed_bfloat16):

    - AMD EPYC with AVX512-BF16, no AMX: gan training 200-202 faces/s against 100-159 in
      float32, cnn training 436-456 ex/s against 226-316, cnn predict 1,351-1,605 img/s
      against 790-993.
    - Intel Xeon with AVX512-BF16 and AMX not exposed: the slower one, gan 100-138 faces/s
      against 200-232, cnn training 397-420 ex/s against 397-655, predict 792-1,485 img/s
      against 1,547-2,196.
    """
    info = _cpuinfo()  # one read of /proc/cpuinfo for the flags and the vendor
    flags = _flags(info)
    return AMX_FLAG in flags or ("avx512_bf16" in flags and info.get("vendor_id") == "AuthenticAMD")


@contextlib.contextmanager
def precision(name: str):
    """Build layers under a Keras dtype policy (`auto`: mixed_bfloat16 on a CPU-only machine
    where `bfloat16_pays`, float32 elsewhere). The policy is saved with each layer, so a loaded
    model computes as it was trained; the global policy is restored."""
    if name == "auto":
        name = "mixed_bfloat16" if not tf.config.list_physical_devices("GPU") and bfloat16_pays() else "float32"
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(before)
