"""The process map: each [[process]] table's stages, CPU and wait strategy, and where the
stages a map leaves out go. Every stage runs in exactly one process; spinners never share a
core and leave one core free."""

from __future__ import annotations

import os
from dataclasses import replace

from exposure.config.defaults import OPTIONAL_STAGES, STAGES
from exposure.config.merge import PROCESS_KEYS, check_keys
from exposure.config.model import ConfigError, ProcessSpec
from exposure.shm.control import MAX_PROCESSES
from exposure.shm.wait_names import WAIT_STRATEGIES

__all__ = ["resolve_cpu", "parse_processes", "place_stages"]


def resolve_cpu(cpu, where: str = "") -> int | None:
    """A ``cpu`` setting: None (not pinned), or a CPU of this machine (a negative number
    counts from the last); ConfigError naming ``where`` + ``cpu`` otherwise."""
    if cpu is None:
        return None
    if isinstance(cpu, bool) or not isinstance(cpu, int):
        raise ConfigError(f"{where}cpu = {cpu!r}: a CPU number")
    cpus = sorted(os.sched_getaffinity(0))
    if -len(cpus) <= cpu < 0:
        cpu = cpus[cpu]
    if cpu not in cpus:
        raise ConfigError(f"{where}cpu = {cpu}: this machine has CPUs "
                          f"{', '.join(map(str, cpus))}")
    return cpu


def parse_processes(raw) -> list[ProcessSpec]:
    """The [[process]] tables as they are written (see :func:`place_stages` for what the
    map may leave out)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("[[process]]: at least one process is needed")
    procs: list[ProcessSpec] = []
    seen_stage: dict[str, str] = {}
    spinners: dict[int, str] = {}
    for k, p in enumerate(raw):
        if not isinstance(p, dict):
            raise ConfigError(f"process[{k}] must be a table")
        procs.append(_process(k, p, {q.name for q in procs}, seen_stage, spinners))
    return procs


def _process(k: int, p: dict, names: set[str], seen_stage: dict[str, str],
             spinners: dict[int, str]) -> ProcessSpec:
    """process[k]; ``names``, ``seen_stage`` (stage: process) and ``spinners`` (cpu:
    process) are the processes before it; this one's stages and spin are added."""
    where = f"process[{k}]."
    check_keys(p, PROCESS_KEYS, where)
    pname = p.get("name", f"p{k}")
    if pname in names:
        raise ConfigError(f"{where}name = {pname!r} is used twice")
    stages = p.get("stages")
    if not stages:
        raise ConfigError(f"{where}stages: a process runs at least one stage")
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"{where}stages: unknown stage {s!r} (stages: "
                              f"{', '.join(STAGES)})")
        if s in seen_stage:
            raise ConfigError(f"stage {s!r} is in both process {seen_stage[s]!r} and "
                              f"{pname!r}")
        seen_stage[s] = pname
    cpu = resolve_cpu(p.get("cpu"), where)
    wait = p.get("wait", "spin-then-block")
    _check_wait(where, pname, wait, cpu, spinners)
    tick = p.get("tick_us", 500)
    if not 10 <= tick <= 1_000_000:
        raise ConfigError(f"{where}tick_us = {tick}: 10..1000000")
    nice = p.get("nice", 0)
    if not -20 <= nice <= 19:
        raise ConfigError(f"{where}nice = {nice}: -20..19")
    return ProcessSpec(pname, tuple(stages), cpu, wait, tick, nice)


def _check_wait(where: str, pname: str, wait, cpu: int | None,
                spinners: dict[int, str]) -> None:
    """A known strategy; a spinner is pinned, alone on its cpu (added to ``spinners``)."""
    if wait not in WAIT_STRATEGIES:
        raise ConfigError(f"{where}wait = {wait!r}: one of {', '.join(WAIT_STRATEGIES)}")
    if wait != "spin":
        return
    if cpu is None:
        raise ConfigError(f"{where}wait = 'spin' needs a pinned cpu")
    if cpu in spinners:
        raise ConfigError(f"processes {spinners[cpu]!r} and {pname!r} both spin on "
                          f"cpu {cpu}: spinners must not share a core")
    spinners[cpu] = pname


def place_stages(procs: list[ProcessSpec], snapshot_port: int, replicated: bool,
                 scheduled: bool = False) -> tuple[ProcessSpec, ...]:
    """The map with the recovery server placed (when ``snapshot_port`` is set and no process
    names it: where the journal runs, never on a spinning hot path, else the last process),
    the scheduled roll likewise (when ``scheduled``: [day] roll_at),
    every stage the node needs placed (the mirror only when ``replicated``), at most
    MAX_PROCESSES processes and at least one core left unspun."""
    procs = list(procs)
    placed = {s for p in procs for s in p.stages}
    if "snapshot" not in placed and snapshot_port:
        k = next(k for k, p in enumerate(procs) if "journal" in p.stages) \
            if "journal" in placed else len(procs) - 1
        procs[k] = replace(procs[k], stages=procs[k].stages + ("snapshot",))
        placed.add("snapshot")
    if "roll" not in placed and scheduled:
        k = next(k for k, p in enumerate(procs) if "journal" in p.stages) \
            if "journal" in placed else len(procs) - 1
        procs[k] = replace(procs[k], stages=procs[k].stages + ("roll",))
        placed.add("roll")
    missing = [s for s in STAGES if s not in placed
               and (s not in OPTIONAL_STAGES or (s == "mirror" and replicated))]
    if missing:
        raise ConfigError(f"stage(s) {', '.join(missing)} run in no process")
    if len(procs) > MAX_PROCESSES:
        raise ConfigError(f"{len(procs)} [[process]] tables: at most {MAX_PROCESSES}")
    spinners = {p.cpu for p in procs if p.wait == "spin"}
    cpus = sorted(os.sched_getaffinity(0))
    if spinners and len(spinners) >= len(cpus):
        raise ConfigError(f"{len(spinners)} spinning process(es) on {len(cpus)} CPU(s): leave "
                          "one core for everything else (use wait = 'spin-then-block')")
    return tuple(procs)
