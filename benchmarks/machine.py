"""What a benchmark result records about the machine it ran on (ratios move with the CPU)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

# CPU features that change our figures: vector width, bf16/fp16 arithmetic, AMX tiles.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(flags.split(":", 1)[1].split())
    return [f for f in FEATURES if f in have]


def machine_info() -> dict:
    import torch

    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "python": platform.python_version()}


def write_result(path: Path, result: dict) -> dict:
    """The result JSON under benchmarks/results/, and on stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def peak_bytes(fn) -> int:
    """Peak bytes torch's CPU allocator held during ``fn`` above what it held when ``fn`` started:
    the running sum of every allocation (+) and free (-) that torch's profiler records, in order.
    Exact at the allocator's level, unlike the process RSS (the allocator caches and the high-water
    mark never comes down)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def regressions(committed: Path, fresh: dict[str, float], goals: dict[str, float], floor: float = 0.5) -> list[str]:
    """What a fresh run lost: every figure (higher is better) under its goal, or under ``floor``
    times the committed result of the same name when that was measured on the same CPU model with
    the same vector features (machines sold under one name differ: an EPYC with or without
    AVX-512). ``committed`` is read before the fresh result replaces it."""
    old: dict[str, float] = {}
    try:
        saved = json.loads(committed.read_text())
        machine = saved.get("machine", {})
        if machine.get("cpu") == cpu_model() and machine.get("cpu_features") == cpu_features():
            old = saved.get("figures", {})
    except (OSError, ValueError):
        pass
    out = []
    for name, value in fresh.items():
        if name in goals and value < goals[name]:
            out.append(f"{name}: {value:,.3g} is under the goal {goals[name]:,.3g}")
        if name in old and value < floor * old[name]:
            out.append(f"{name}: {value:,.3g} is under {floor:g}x the committed {old[name]:,.3g} ({committed.name})")
    return out
