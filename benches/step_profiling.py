"""Shared by the training-step profiles (``profile_training_step.py``, ``profile_rd_step.py``):
interleaved step timings, their table, and torch.profiler's self CPU time by operator group."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_steps(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Each step once to warm up, then `repeats` rounds of every step in turn: seconds per call."""
    for f in steps.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, f in steps.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return times


def print_step_table(title: str, times: dict[str, list[float]], batch: int) -> None:
    """A markdown table: median and minimum seconds per step, images per second at the median."""
    print(f"### {title}\n")
    print("| step | s, median | images/s | s, min |\n|---|---|---|---|")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m:.3f} | {batch / m:.1f} | {min(t):.3f} |")


def print_operator_shares(prof, group_of: Callable[[str], str], caption: str) -> None:
    """The share of self CPU time of each operator group (`group_of` an aten operator name) and of
    the ten operators with the most, from a finished ``torch.profiler.profile``."""
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ops)
    groups: dict[str, float] = {}
    for evt in ops:
        group = group_of(evt.key)
        groups[group] = groups.get(group, 0.0) + evt.self_cpu_time_total
    print(f"\nSelf CPU time by operator group ({caption}):\n")
    print("| group | share |\n|---|---|")
    for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {100 * us / total:.1f} % |")
    print("\nThe ten operators with the most self CPU time:\n")
    print("| operator | share |\n|---|---|")
    for evt in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"| `{evt.key}` | {100 * evt.self_cpu_time_total / total:.1f} % |")
