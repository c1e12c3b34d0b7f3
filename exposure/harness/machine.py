"""What else the machine did while something was measured: hypervisor steal and the other
shares of all CPUs' time (``/proc/stat``'s cpu line) and CPU pressure
(``/proc/pressure/cpu``). The one reader of both, for the benchmarks, the perf tool and
the fuzzer."""

from __future__ import annotations

import os

__all__ = ["cpu_jiffies", "cpu_shares", "steal_ticks", "steal_since", "steal_ms",
           "cpu_pressure_us"]

# /proc/stat's cpu line after its name, in jiffies (proc(5)).
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_STEAL = CPU_FIELDS.index("steal")


def cpu_jiffies() -> list[int]:
    """All CPUs' time so far by kind (``/proc/stat``'s cpu line: user nice system idle
    iowait irq softirq steal guest guest_nice), in jiffies."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def cpu_shares(before: list[int], after: list[int]) -> dict[str, float]:
    """Each kind's percent of all CPUs' time between two :func:`cpu_jiffies`."""
    d = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(d[:len(CPU_FIELDS)]) or 1
    return {k: round(100 * d[i] / total, 2) for i, k in enumerate(CPU_FIELDS)}


def steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far."""
    v = cpu_jiffies()
    return v[_STEAL] if len(v) > _STEAL else 0, sum(v)


def steal_since(s0: tuple[int, int]) -> dict:
    """Steal since ``s0`` (a :func:`steal_ticks`): its percent of all CPUs' time and its
    seconds."""
    s1 = steal_ticks()
    st, tot = s1[0] - s0[0], max(s1[1] - s0[1], 1)
    return {"steal_percent": round(100 * st / tot, 2),
            "steal_s": round(st / os.sysconf("SC_CLK_TCK"), 2)}


def steal_ms() -> float:
    """Hypervisor steal of all CPUs so far, in ms (0 where unknown)."""
    try:
        return cpu_jiffies()[_STEAL] * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_pressure_us() -> int:
    """Microseconds so far in which some runnable task waited for a CPU (PSI,
    /proc/pressure/cpu "some"; 0 where the kernel has none)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return 0
