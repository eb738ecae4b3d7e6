"""Accelerator memory as ggml sees it (free / total per GPU), for the stats panel and planner."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

GGML_BACKEND_DEVICE_TYPE_CPU = 0


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    name: str
    description: str
    free: int
    total: int
    is_gpu: bool


@cache
def _ggml() -> ctypes.CDLL | None:
    try:
        from llama_cpp import _ggml as ggml_module
    except Exception:  # a missing or odd build: no device telemetry, nothing else breaks
        return None
    lib: ctypes.CDLL = ggml_module.libggml
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    return lib


def devices() -> list[DeviceMemory]:
    """Every ggml device with its memory; CPU devices report system RAM."""
    from beechat.engine.llama import llama_log

    llama_log()  # backends are registered by llama_backend_init
    lib = _ggml()
    if lib is None:
        return []
    found: list[DeviceMemory] = []
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(DeviceMemory(
            name=(lib.ggml_backend_dev_name(dev) or b"?").decode(),
            description=(lib.ggml_backend_dev_description(dev) or b"").decode(),
            free=int(free.value), total=int(total.value),
            is_gpu=int(lib.ggml_backend_dev_type(dev)) != GGML_BACKEND_DEVICE_TYPE_CPU,
        ))
    return found


def gpu_memory() -> tuple[int, int] | None:
    """(used, total) bytes summed over GPUs, or None without a GPU."""
    gpus = [d for d in devices() if d.is_gpu and d.total > 0]
    if not gpus:
        return None
    total = sum(d.total for d in gpus)
    return total - sum(d.free for d in gpus), total
