"""Latency of the unpooled and the converted model, timed in the same run, interleaved, on the same input.

Per runtime and batch size: warm-up calls for both models, then rounds that time one call of each, the
order alternating every round so that drift (frequency, cache, other load) falls on both alike. CPU calls
are timed with perf_counter; CUDA calls with CUDA events after a synchronise. ONNX Runtime sessions stop
their worker threads' spinning when a run returns, so neither model is timed against the other session's
busy-waiting threads, while each run spins as a deployed session does.
Peak memory is measured in a separate untimed pass of three calls. torch runtimes: the peak of the tensor
memory torch's allocator holds beyond the weights and input (on CUDA its own statistics, on the CPU the
profiler's allocation events). ONNX Runtime on the CPU: the rise of the process's peak resident set, on a
fresh session (a warmed session's arena already holds its peak), after the C heap has handed its free
pages back (glibc's malloc_trim) and the kernel's high-water mark has been reset through
/proc/self/clear_refs. ONNX Runtime on CUDA allocates outside torch and is not measured.

The efficiency of the converted model is its speed-up divided by its MAC speed-up (baseline MACs over
converted MACs, pooling layers included): 1.0 means every MAC saved turned into time saved.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vitpool.errors import VitpoolError

RUNTIMES = ("torch", "torch-compile", "onnxruntime")


@dataclass
class BenchRow:
    model: str  # "baseline" or "pooled"
    runtime: str
    device: str
    precision: str
    batch_size: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    images_per_s: float
    peak_mem_mb: float | None
    gmacs: float  # per image
    speedup: float | None = None  # baseline p50 / pooled p50
    mac_speedup: float | None = None  # baseline MACs / pooled MACs
    efficiency: float | None = None  # speedup / mac_speedup
    optimized: bool = False  # onnxruntime: the graphs went through ONNX Runtime's transformer optimizer
    first_call_s: float | None = None  # before the warm-up: torch-compile's compilation for this batch size


def environment(device: str, threads: int) -> dict:
    import torch

    from vitpool.models import import_timm

    timm = import_timm()

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name()
    return {"torch": torch.__version__, "timm": timm.__version__, "onnxruntime": ort_version, "device_name": name,
            "threads": threads, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            # hosts named alike differ: AVX2 or AVX-512 changes the relative cost of small ops
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(field)


def tensor_peak_mb(call: Callable[[], object], device: str, repeats: int = 3) -> float:
    """Peak of the tensor memory torch's allocator holds beyond what it held before, over `repeats` calls.

    CUDA: the allocator's own peak. CPU: the same figure from the profiler's allocation events, as torch keeps
    no CPU allocator statistics; the process's resident set would add the C heap's fragmentation, which
    varied by tens of MB between identical DeiT-S batch-32 passes."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _c_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(repeats):
            call()
    changes = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                     if event.name() == "[memory]")
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


@contextlib.contextmanager
def _c_stderr_silenced() -> Iterator[None]:
    """The profiler's Kineto writes two lines to the process's stderr for every pass, whatever its log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing happens).

    glibc keeps the memory that earlier calls freed, and a call that reuses it raises the resident set by
    nothing: a warmed-up call that allocates 16 MB read as 0 MB."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def resident_peak_mb(call: Callable[[], object], repeats: int = 3) -> float | None:
    """Rise of the process's peak resident set over `repeats` calls (Linux; None elsewhere): memory that
    torch cannot see, such as ONNX Runtime's."""
    try:
        release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        before = _rss_mb("VmRSS")
        for _ in range(repeats):
            call()
        # The kernel reads resident-set counters approximately (per-CPU counters folded lazily), so a pass
        # that allocates nothing can read a few pages below its starting point: the rise is at least zero.
        return max(0.0, _rss_mb("VmHWM") - before)
    except OSError:
        return None


class Timer:
    """Times one call: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, call: Callable[[], object]) -> float:
        import torch

        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        call()
        return (time.perf_counter() - begin) * 1e3


def time_in_turns(calls: dict[str, Callable[[], object]], rounds: int, timer: Timer,
                  on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Milliseconds of each call per round; every round times each call once, the order alternating, so that
    drift in the machine's speed falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds):
        if on_round:
            on_round(round_ + 1)
        for name in list(calls) if round_ % 2 == 0 else list(reversed(calls)):
            times[name].append(timer(calls[name]))
    return times


def torch_runner(model, images, device: str, precision: str, compiled: bool) -> Callable[[], object]:
    import torch

    model = model.to(device).eval()
    if compiled:
        model = torch.compile(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def call():
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            return model(images)

    return call


def onnx_runner(path: Path, images, device: str, threads: int) -> Callable[[], object]:
    """A new ONNX Runtime session on `path`, run on `images`."""
    from vitpool.export import INPUT_NAME, session

    runtime = session(path, device, threads, spin_after_run=False)  # the two models' sessions run in turns
    feed = {INPUT_NAME: images.cpu().numpy()}
    return lambda: runtime.run(None, feed)


def _summary(times: list[float], batch: int) -> dict:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(ordered), "p90_ms": p90, "mean_ms": statistics.fmean(ordered),
            "images_per_s": 1e3 * batch / statistics.median(ordered)}


def check_memory(model, batch: int, device: str) -> None:
    """One line for a batch whose input images alone exceed the memory free on `device` (activations need more)."""
    import torch

    needed = batch * model.patch_embed.proj.in_channels * math.prod(model.patch_embed.img_size) * 4
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if free is not None and needed > free:
        raise VitpoolError(f"--batch-size {batch} needs {needed / 2**30:.1f} GiB for its input images alone (more for "
                           f"the activations), and {device} has {free / 2**30:.1f} GiB free; use a smaller batch")


def bench(
    baseline,
    pooled,
    runtimes: list[str],
    batch_sizes: list[int],
    device: str = "cpu",
    precision: str = "fp32",
    warmup: int = 5,
    rounds: int = 30,
    threads: int | None = None,
    on_step: Callable[[str], None] | None = None,
    stop_at_fixed_point: bool = False,
    passes=None,
) -> tuple[list[BenchRow], dict]:
    """Rows for both models at every runtime and batch size, and the environment they were measured in.

    `stop_at_fixed_point` exports the ONNX Runtime models as `vitpool.export.to_onnx` does with it; `passes`
    (`vitpool.export.GraphPasses`: optimizer, int8) go over both models' files alike."""
    import torch

    from vitpool.export import GraphPasses, to_onnx
    from vitpool.flops import total_macs

    if device == "cuda" and not torch.cuda.is_available():
        raise VitpoolError("--device cuda, but torch sees no CUDA GPU here; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise VitpoolError(f"unknown device {device!r}: use cpu or cuda")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise VitpoolError(f"unknown runtime {', '.join(unknown)}: choose from {', '.join(RUNTIMES)}")
    passes = passes or GraphPasses()
    if (stop_at_fixed_point or passes) and "onnxruntime" not in runtimes:
        raise VitpoolError("--stop-at-fixed-point, --optimize and --quantize shape the ONNX graphs: add onnxruntime to --runtime, or drop them")
    if precision not in ("fp32", "bf16", "fp16"):
        raise VitpoolError(f"unknown precision {precision!r}: use bf16 or fp16 with --amp")
    if precision != "fp32" and device != "cuda":
        raise VitpoolError(f"--amp {precision} is for CUDA; drop it on the CPU")
    check_memory(baseline, max(batch_sizes), device)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    models = {"baseline": baseline.eval(), "pooled": pooled.eval()}
    macs = {name: total_macs(model) for name, model in models.items()}
    timer = Timer(device)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory() as workdir:
        onnx_paths = {name: Path(workdir) / f"{name}.onnx" for name in models}
        if "onnxruntime" in runtimes:
            if on_step:
                on_step("onnxruntime: exporting")
            for name, model in models.items():
                # one file per model: its batch axis is dynamic
                to_onnx(model.cpu(), onnx_paths[name], stop_at_fixed_point=stop_at_fixed_point)
                passes.apply(onnx_paths[name], model)
        for runtime in runtimes:
            for batch in batch_sizes:
                channels, height, width = baseline.patch_embed.proj.in_channels, *baseline.patch_embed.img_size
                images = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0)).to(device)
                if on_step:
                    on_step(f"{runtime}, batch {batch}: preparing")
                calls = {
                    name: onnx_runner(onnx_paths[name], images, device, threads) if runtime == "onnxruntime"
                    else torch_runner(model, images, device, precision, compiled=runtime == "torch-compile")
                    for name, model in models.items()
                }
                first_call_s = {name: timer(call) / 1e3 for name, call in calls.items()}  # torch-compile compiles here
                for call in calls.values():
                    for _ in range(warmup):
                        call()
                if runtime != "onnxruntime":
                    memory = {name: tensor_peak_mb(call, device) for name, call in calls.items()}
                elif device == "cpu":  # a fresh session: the warmed one's arena already holds its peak
                    memory = {name: resident_peak_mb(onnx_runner(onnx_paths[name], images, device, threads))
                              for name in models}
                else:
                    memory = {name: None for name in models}
                progress = (lambda done: on_step(f"{runtime}, batch {batch}: round {done}/{rounds}")) if on_step else None
                times = time_in_turns(calls, rounds, timer, progress)
                summaries = {name: _summary(times[name], batch) for name in calls}
                speedup = summaries["baseline"]["p50_ms"] / summaries["pooled"]["p50_ms"]
                mac_speedup = macs["baseline"] / macs["pooled"]
                for name in calls:
                    extra = {"speedup": speedup, "mac_speedup": mac_speedup, "efficiency": speedup / mac_speedup} if name == "pooled" else {}
                    onnx = runtime == "onnxruntime"
                    row_precision = passes.precision if onnx else precision  # autocast is a torch feature
                    rows.append(BenchRow(name, runtime, device, row_precision, batch, **summaries[name],
                                         peak_mem_mb=memory[name], gmacs=macs[name] / 1e9, **extra,
                                         optimized=onnx and passes.optimize, first_call_s=first_call_s[name]))
    return rows, environment(device, threads)


def rows_to_json(rows: list[BenchRow], env: dict) -> list[dict]:
    """One JSON object per row, each carrying the environment, so the list loads as one table."""
    return [{**asdict(row), "env": env} for row in rows]
