"""NVML reporting degrades to "no GPU" without a driver, and reads a GPU's figures when one is there."""

from __future__ import annotations

import sys
import types

import pytest

from services.worker.gpu import gpu_inventory


def test_no_driver_means_no_gpus_not_an_error() -> None:
    # This machine has no NVIDIA driver: NVML cannot initialise, and that is a normal answer.
    assert isinstance(gpu_inventory(), list)


def test_reads_each_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("pynvml")
    mem = types.SimpleNamespace(used=3 << 30, total=80 << 30)
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA A100-SXM4-80GB"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = lambda h: mem  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40 + h)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inv = gpu_inventory()
    assert [g["index"] for g in inv] == [0, 1]
    assert inv[1] == {
        "index": 1,
        "name": "NVIDIA A100-SXM4-80GB",
        "memory_used_mib": 3072,
        "memory_total_mib": 81920,
        "utilization_pct": 41,
    }


def test_init_failure_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("pynvml")

    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_inventory() == []
