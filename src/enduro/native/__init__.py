"""enduro's own CPU kernels, in C, built at run time with the machine's compiler.

Built once per source, compiler and CPU into the cache directory (`ENDURO_CACHE_DIR`, else
~/.cache/enduro) and loaded with ctypes: a build takes about a second, not the half minute
a torch C++ extension's headers cost, and needs no Python headers. `-march=native` is safe
because the library is built on the machine that runs it (the CPU's flags are in the cache
key). Without a compiler, or if the build fails, `load()` returns None and callers keep
their torch path; the reason is logged once.

Kernels: `decode_attention` (attention of one new token per request straight from the paged
KV cache, `decode_attention.c`), `prefill_attention` (of prompt chunks, causal, from the
cache in place, `prefill_attention.c`), `rms_norm` (a whole norm, and the residual add after it, in
one call, `rms_norm.c`), `linear_int8` / `linear_bf16` (a projection of a few rows on int8 or
plain bf16 weights, `linear.c`), `linear_w8a8` (int8 weights by int8 activations quantized
on the fly, `linear_w8a8.c`), and `decode_layer` (a decoder layer's whole decode step,
built from the others, `decode_layer.c`, which also exports its gated activation, `act_and_mul`, for
prompts), and `sample` (a step's next tokens: argmax or an inverse-CDF draw per row,
`sample.c`).
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch  # noqa: F401  (loaded first, for its OpenMP runtime: see _bind)

from enduro.loading.loader import default_cache_dir

logger = logging.getLogger(__name__)

SOURCES = (
    "decode_attention.c",
    "prefill_attention.c",
    "rms_norm.c",
    "linear.c",
    "linear_w8a8.c",
    "decode_layer.c",
    "sample.c",
)
HEADERS = ("bf16.h", "paged.h", "threads.h", "vexp.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")

_enabled = True


def use_native(enabled: bool) -> None:
    """Process-wide switch (`--native-kernels`): with False, `load()` returns None."""
    global _enabled
    _enabled = enabled


@dataclass(frozen=True)
class Library:
    path: Path
    decode_attention: "ctypes._NamedFuncPointer"
    prefill_attention: "ctypes._NamedFuncPointer"
    rms_norm: "ctypes._NamedFuncPointer"
    linear_int8: "ctypes._NamedFuncPointer"
    linear_bf16: "ctypes._NamedFuncPointer"
    linear_w8a8: "ctypes._NamedFuncPointer"
    linear_w8a8_scalar: "ctypes._NamedFuncPointer"
    decode_layer: "ctypes._NamedFuncPointer"
    sample: "ctypes._NamedFuncPointer"
    act_and_mul: "ctypes._NamedFuncPointer"
    quantize_rows: "ctypes._NamedFuncPointer"
    w8a8_vectorized: "ctypes._NamedFuncPointer"


def enabled() -> bool:
    """Whether native kernels are switched on (they may still be unavailable: see `load`)."""
    return _enabled


def load() -> Library | None:
    """The built kernels, or None (switched off, no compiler, or a failed build)."""
    return _load() if _enabled else None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


@functools.cache
def _load() -> Library | None:
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: native kernels off, attention runs on torch")
        return None
    package = resources.files(__name__)
    sources = {name: package.joinpath(name).read_text() for name in SOURCES + HEADERS}
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        logger.warning("C compiler %s unusable (%s): native kernels off", compiler, error)
        return None
    key = hashlib.sha256(
        "\0".join([*sources.values(), version, " ".join(CFLAGS), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    path = default_cache_dir() / "native" / f"enduro_native-{key}.so"
    if not path.exists():
        try:
            _build(compiler, sources, path)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            logger.warning("building native kernels failed: %s; attention runs on torch", detail)
            return None
    return _bind(path)


def _build(compiler: str, sources: dict[str, str], path: Path) -> None:
    """Compiles into a temporary file, then renames it: processes racing to build (the
    engine and a test) never load a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        files = []
        for name, text in sources.items():
            (Path(scratch) / name).write_text(text)
            if name in SOURCES:  # headers are included, not compiled
                files.append(str(Path(scratch) / name))
        built = Path(scratch) / path.name
        subprocess.run(
            [compiler, *CFLAGS, *files, "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(built, path)


def _bind(path: Path) -> Library:
    # torch is imported (at the top of this module), so "libgomp.so.1" resolves to the OpenMP
    # runtime it loaded: the kernels' threads are torch's.
    lib = ctypes.CDLL(str(path))
    fn = lib.enduro_decode_attention
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [pointer] * 4 + [i64] + [pointer] * 3 + [i64] * 5 + [ctypes.c_float, pointer]
    fn.restype = ctypes.c_int
    prefill = lib.enduro_prefill_attention
    prefill.argtypes = [pointer] * 4 + [i64] + [pointer] * 3 + [i64] * 6 + [ctypes.c_float, pointer]
    prefill.restype = ctypes.c_int
    norm = lib.enduro_rms_norm
    norm.argtypes = [
        pointer,
        i64,
        i64,
        i64,
        i64,
        pointer,
        ctypes.c_float,
        ctypes.c_int,
        pointer,
        pointer,
    ]
    norm.restype = None
    int8 = lib.enduro_linear_int8
    int8.argtypes = [pointer, i64, i64, pointer, pointer, i64, pointer]
    int8.restype = None
    bf16 = lib.enduro_linear_bf16
    bf16.argtypes = [pointer, i64, i64, pointer, i64, pointer]
    bf16.restype = None
    layer = lib.enduro_decode_layer
    layer.argtypes = [pointer, pointer, i64, pointer, pointer]
    layer.restype = ctypes.c_int
    sample = lib.enduro_sample
    sample.argtypes = [pointer, ctypes.c_int, i64, i64, pointer, pointer, pointer]
    sample.restype = ctypes.c_int
    act = lib.enduro_act_and_mul
    act.argtypes = [pointer, i64, i64, ctypes.c_int, pointer]
    act.restype = None
    w8a8, w8a8_scalar = lib.enduro_linear_w8a8, lib.enduro_linear_w8a8_scalar
    for linear in (w8a8, w8a8_scalar):
        linear.argtypes = [pointer, i64, i64, pointer, pointer, i64, i64, pointer]
        linear.restype = ctypes.c_int
    quantize = lib.enduro_quantize_rows
    quantize.argtypes = [pointer, i64, i64, i64, pointer, pointer, pointer]
    quantize.restype = None
    vectorized = lib.enduro_w8a8_vectorized
    vectorized.argtypes = []
    vectorized.restype = ctypes.c_int
    return Library(
        path,
        decode_attention=fn,
        prefill_attention=prefill,
        rms_norm=norm,
        linear_int8=int8,
        linear_bf16=bf16,
        linear_w8a8=w8a8,
        linear_w8a8_scalar=w8a8_scalar,
        decode_layer=layer,
        sample=sample,
        act_and_mul=act,
        quantize_rows=quantize,
        w8a8_vectorized=vectorized,
    )
