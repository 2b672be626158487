"""Where and how the models run: the default device, the dtype ``auto`` picks (bf16 only
where the CPU / GPU has native bf16; the choice and its reason logged once) and the
CPU thread count of long stages (physical cores the process may use, a cgroup quota,
``OMP_NUM_THREADS``; logged)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ssd_guard.models")

__all__ = [
    "NATIVE_BF16_FLAGS",
    "auto_dtype",
    "cpu_flags",
    "default_device",
    "default_num_threads",
    "resolve_dtype",
    "resolve_threads",
    "use_threads",
]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic: AVX512-BF16 and AMX-BF16 on
#: x86, the BF16 extension on AArch64. Without one, torch emulates bf16 matmuls by
#: converting to fp32 and back, which measured 7.7x slower than plain fp32 on an
#: AVX2-only CPU.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU's feature flags (x86 ``flags``, AArch64 ``Features``) from *cpuinfo*
    (default: ``/proc/cpuinfo``); ``None`` when they cannot be read (not Linux)."""
    text = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def _cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # pragma: no cover - old torch
        return "unknown"


def auto_dtype(
    device: torch.device | str,
    *,
    flags: Collection[str] | None = None,
    capability: str | None = None,
    cuda_bf16: bool | None = None,
) -> tuple[torch.dtype, str]:
    """What ``dtype: auto`` means on *device*, and why.

    CPU: bf16 only when the CPU computes it natively (a flag of
    :data:`NATIVE_BF16_FLAGS`, or torch's CPU capability says AMX), else fp32. CUDA:
    bf16 when the GPU supports it, else fp32 (fp16 overflows in some models, e.g.
    Gemma). Other devices: fp32. *flags*, *capability* and *cuda_bf16* default to what
    this machine reports (tests inject them).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = cuda_bf16
        if ok is None:
            ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if ok:
            return torch.bfloat16, "the GPU supports bf16 natively"
        return torch.float32, "the GPU has no bf16 support (and fp16 can overflow)"
    if dev.type != "cpu":
        return torch.float32, f"no bf16 policy for device type {dev.type!r}"
    have = cpu_flags() if flags is None else frozenset(flags)
    cap = _cpu_capability() if capability is None else capability
    native = sorted(NATIVE_BF16_FLAGS & set(have or ()))
    if native:
        return torch.bfloat16, f"the CPU has native bf16 ({', '.join(native)})"
    if "AMX" in cap.upper():
        return torch.bfloat16, f"the CPU has native bf16 (torch CPU capability {cap})"
    seen = "CPU flags unreadable" if have is None else "no avx512_bf16 / amx_bf16 CPU flag"
    return (
        torch.float32,
        f"the CPU has no native bf16 ({seen}; torch CPU capability {cap}): bf16 would be "
        "emulated, several times slower than fp32",
    )


_LOGGED: set[str] = set()


def _log_choice(event: str, *, once: bool = True, **fields: Any) -> None:
    """A structured INFO line, ``event key=value ...`` (the fields are also attributes
    of the record); with *once*, logged once per distinct line in a process."""
    text = " ".join(
        f'{k}="{v}"' if " " in str(v) or not str(v) else f"{k}={v}" for k, v in fields.items()
    )
    line = f"{event} {text}"
    if once and line in _LOGGED:
        return
    _LOGGED.add(line)
    log.info("%s", line, extra={"event": event, **fields})


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype)
    )


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name as a torch dtype; ``auto`` (or ``None``) is :func:`auto_dtype` for
    *device* (logged once, with its reason)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        chosen, reason = auto_dtype(device)
        _log_choice(
            "dtype.auto", dtype=_dtype_name(chosen), device=torch.device(device).type, reason=reason
        )
        return chosen
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'")
    return table[dtype]


# --------------------------------------------------------------------------- CPU threads
def _physical_cores(cpuinfo: str, allowed: Collection[int] | None) -> int | None:
    """Distinct (package, core) pairs among the *allowed* logical CPUs of *cpuinfo*;
    ``None`` when it does not say (e.g. no ``core id`` lines)."""
    cores: set[tuple[str, str]] = set()
    proc: int | None = None
    package = core = None
    for line in [*cpuinfo.splitlines(), ""]:
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not line.strip():
            if proc is not None and core is not None and (allowed is None or proc in allowed):
                cores.add((package or "0", core))
            proc, package, core = None, None, None
        elif sep and key == "processor" and value.isdigit():
            proc = int(value)
        elif sep and key == "physical id":
            package = value
        elif sep and key == "core id":
            core = value
    return len(cores) or None


def _cgroup_cpu_limit(files: Mapping[str, str] | None = None) -> int | None:
    """The CPUs a cgroup CPU quota allows (``ceil(quota / period)``), ``None`` if none."""

    def read(path: str) -> str | None:
        if files is not None:
            return files.get(path)
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            return None

    v2 = read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    q, p = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if q and p and q.lstrip("-").isdigit() and p.isdigit() and int(q) > 0 and int(p) > 0:
        return max(1, math.ceil(int(q) / int(p)))
    return None


def default_num_threads(
    *,
    cpuinfo: str | None = None,
    affinity: Collection[int] | None = None,
    cgroup: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """The torch thread count for long CPU stages, and how it was found: the smallest of
    the physical cores among the CPUs this process may run on, those CPUs
    (``os.sched_getaffinity``) and a cgroup CPU quota. Hyper-threads and CPUs another
    container owns only add contention. The arguments default to this machine's."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not Linux
            affinity = range(os.cpu_count() or 1)
    allowed = set(affinity)
    physical = _physical_cores(_proc_cpuinfo() if cpuinfo is None else cpuinfo, allowed)
    quota = _cgroup_cpu_limit(cgroup)
    parts = {"physical cores": physical, "CPUs allowed": len(allowed), "cgroup quota": quota}
    n = max(1, min(v for v in parts.values() if v is not None))
    why = ", ".join(f"{k} {v}" for k, v in parts.items() if v is not None)
    return n, f"min({why})"


def resolve_threads(
    requested: int | None, *, env: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """The thread count to set (``None``: leave torch's) and its source: *requested*
    (a recipe or ``--threads``), else ``OMP_NUM_THREADS`` when set (torch already
    follows it), else :func:`default_num_threads`."""
    environ = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return requested, "requested (recipe `threads` / --threads)"
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS'].strip()}"
    n, why = default_num_threads()
    return n, f"default: {why}"


@contextlib.contextmanager
def use_threads(requested: int | None = None) -> Iterator[int]:
    """Run a block with :func:`resolve_threads`'s torch thread count (logged), restoring
    the previous count afterwards; yields the count in use."""
    before = torch.get_num_threads()
    n, source = resolve_threads(requested)
    if n is not None and n != before:
        torch.set_num_threads(n)
    in_use = torch.get_num_threads()
    _log_choice("threads", once=False, threads=in_use, source=source)
    try:
        yield in_use
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
