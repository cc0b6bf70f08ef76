"""The ``diagnose`` job: device, memory, library versions, and an optional
matrix-multiply benchmark (which also serves as a cancellable long job)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from gen3d_wire.protocol import Attachment

from ..common import device as dev
from ..service.jobs import JobContext, JobInputs, JobOutput, JobSpec, Param
from ..common.progress import NULL, Progress


@dataclass
class DiagnoseReport:
    device: dict
    memory: dict
    versions: dict
    renderer: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)


def matmul_bench(device: str, seconds: float, size: int, progress: Progress = NULL) -> dict:
    """Multiply two ``size`` x ``size`` float32 matrices for about ``seconds``.
    Checks for cancellation between multiplications. Returns GFLOP/s."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    peak = dev.process_rss_bytes()
    n = 0
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        progress.update(min(1.0, elapsed / seconds) if seconds > 0 else 1.0, f"{n} matmuls")
        if elapsed >= seconds:
            break
        c = a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n += 1
        peak = max(peak, dev.process_rss_bytes())
        del c
    elapsed = time.perf_counter() - t0
    return {
        "matmuls": n,
        "size": size,
        "seconds": elapsed,
        "gflops": (2 * size**3 * n / elapsed / 1e9) if elapsed > 0 else 0.0,
        "peak_rss_bytes": peak,
    }


def diagnose(device: str, bench_seconds: float = 0.0, bench_size: int = 512, progress: Progress = NULL) -> DiagnoseReport:
    bench = matmul_bench(device, bench_seconds, bench_size, progress) if bench_seconds > 0 else {}
    from ..gaussians.render import renderer_info

    return DiagnoseReport(dev.device_info(device), dev.memory_info(device), dev.versions(), renderer_info(device), bench)


def _handle(inputs: JobInputs, ctx: JobContext) -> JobOutput:
    p = inputs.params
    report = diagnose(ctx.device, p["bench_seconds"], p["bench_size"], ctx.progress.child("benchmark", 0.0, 1.0))
    data = asdict(report)
    return JobOutput([Attachment("report.json", "application/json", json.dumps(data, indent=2).encode())], data)


SPEC = JobSpec(
    kind="diagnose",
    description="Report the device, memory and library versions; optionally benchmark matrix multiplies.",
    handler=_handle,
    params=(
        Param("bench_seconds", float, 0.0, "seconds of matmul benchmark (0: none)", min=0.0, max=600.0),
        Param("bench_size", int, 512, "matrix size of the benchmark", min=16, max=8192),
    ),
)
