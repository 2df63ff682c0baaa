"""The device a measurement runs on, and its ceilings.

* which device: `device_name` (CUDA name, or the CPU model and thread count), `device_slug` (for file
  names: ``8xh100-80gb-hbm3``, ``cpu``), the rank / world size and rank-0 printing (`say`);
* ceilings: `datasheet_peak_tflops` (dense bf16 tensor-core peak from the data sheet, the denominator of the
  field's MFU), and the measured ones, `measure_matmul_tflops` (dense matmul rate) and
  `measure_copy_bandwidth` (device copy bandwidth);
* `PeakMemory`: the peak memory of one measurement (CUDA allocator peaks, or the host RSS peak on CPU).

Used by the benchmarks (`measure.harness`, tools/benchmark_*.py); nothing here imports the trainer.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import resource
import statistics
import time
from typing import Dict, Optional

import torch


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def say(*a, **k):
    if _rank() == 0:
        print(*a, **k, flush=True)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    n = torch.get_num_threads()
    return f"CPU ({cpu}, {n} thread{'s' if n != 1 else ''})"


def device_slug() -> str:
    if torch.cuda.is_available():
        name = re.sub(r"^NVIDIA[ _-]*", "", torch.cuda.get_device_name())
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
        return f"{_world()}x{slug}"
    return "cpu"


# Data-sheet dense bf16 tensor-core peaks (TFLOP/s, without sparsity), the denominator of the field's MFU:
# name pattern -> peak. The first match wins (PCIe / NVL before the SXM default of the same chip).
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),  # H100 SXM
    ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0),
)


def datasheet_peak_tflops(name: Optional[str] = None, override: Optional[float] = None) -> Dict[str, object]:
    """The data-sheet dense bf16 peak of a device (`DATASHEET_BF16_TFLOPS`), or ``override`` when given.

    Returns ``{"tflops": float or None, "source": str}``; None for a CPU or an unknown device (MFU against
    the data sheet is then not reported)."""
    if override is not None:
        return {"tflops": float(override), "source": "--peak-tflops"}
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for pattern, peak in DATASHEET_BF16_TFLOPS:
        if pattern.lower() in name.lower():
            return {"tflops": peak, "source": f"data sheet, {pattern} bf16 dense"}
    return {"tflops": None, "source": f"no data-sheet peak known for {name!r}"}


def measure_matmul_tflops(n: int, reps: int = 10) -> Dict[str, object]:
    """Dense matmul rate: bf16 on CUDA, fp32 on CPU (median of ``reps`` timed products)."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    reps = reps if cuda else 3
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3 if cuda else 1):
        a @ b
    _sync()
    times = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    del a, b
    t = statistics.median(times)
    return {"tflops": 2.0 * n ** 3 / t / 1e12, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "device": "cuda" if cuda else "cpu", "seconds": t}


def measure_copy_bandwidth(numel: int = 1 << 28, reps: int = 10) -> Dict[str, object]:
    """Device copy bandwidth of ``empty_like(x).copy_(x)`` on ``numel`` bf16 (CUDA) / fp32 (CPU) elements,
    counting bytes read and written (median of ``reps``)."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(numel, device="cuda" if cuda else "cpu", dtype=dtype)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync()
    times = []
    for _ in range(reps if cuda else 3):
        t0 = time.perf_counter()
        y.copy_(x)
        _sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    nbytes = 2 * x.numel() * x.element_size()
    return {"gb_per_s": nbytes / t / 1e9, "bytes": nbytes, "device": "cuda" if cuda else "cpu", "seconds": t}


class PeakMemory:
    """Peak memory of one measurement: CUDA allocator peak, or the host RSS peak increase on CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.kind = "cuda_max_memory_allocated" if self.cuda else "host_peak_rss_increase"
        self.local = False  # True: no collective (a rank-0-only measurement)

    @staticmethod
    def _status(key: str) -> Optional[int]:
        with contextlib.suppress(OSError):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        self.resettable = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (Linux >= 4.0)
            self.resettable = self._status("VmHWM") is not None
        if self.resettable:
            self.base = self._status("VmRSS")
            self.kind = "host_peak_rss_increase"
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = "host_peak_rss_increase_getrusage"

    def peaks_gib(self) -> Dict[str, Optional[float]]:
        """``{"allocated": ..., "reserved": ...}`` in GiB: CUDA ``max_memory_allocated`` and
        ``max_memory_reserved`` (what the caching allocator took from the device; max over ranks unless
        `local`); on CPU the host RSS peak increase as "allocated" and None as "reserved"."""
        if self.cuda:
            v = [float(torch.cuda.max_memory_allocated()), float(torch.cuda.max_memory_reserved())]
            import torch.distributed as dist

            if not self.local and dist.is_initialized() and dist.get_world_size() > 1:
                t = torch.tensor(v, device="cuda")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                v = t.tolist()
            return {"allocated": v[0] / 2 ** 30, "reserved": v[1] / 2 ** 30}
        return {"allocated": self.peak_gib(), "reserved": None}

    def peak_gib(self) -> float:
        if self.cuda:
            return self.peaks_gib()["allocated"]
        peak = self._status("VmHWM") if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0.0, (peak - self.base)) / 2 ** 30
