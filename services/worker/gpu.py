"""What the worker can tell about its GPUs through NVML (pynvml, from nvidia-ml-py).

On a machine without an NVIDIA driver — like the CPU machines the tests run on — NVML fails to
initialise; that is a normal answer here ("no GPU"), never an error: the worker then runs on
the CPU and reports `gpus: []`. Written to work on a GPU host too (untested here: no GPU)."""

from __future__ import annotations

from typing import Any


def gpu_inventory() -> list[dict[str, Any]]:
    """Per visible NVIDIA GPU: index, name, memory used/total (MiB), utilisation (%)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...: no usable GPU here
        return []
    out: list[dict[str, Any]] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # not supported on every board (e.g. some MIG slices)
                util = None
            out.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_used_mib": int(mem.used) // (1 << 20),
                    "memory_total_mib": int(mem.total) // (1 << 20),
                    "utilization_pct": util,
                }
            )
    except Exception:  # a device that vanished mid-query: report what we have
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out
