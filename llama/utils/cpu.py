"""What CPU this is: its model name and feature flags, which key the build and tuning caches
and name the benchmark results (kernel choices tuned on one CPU are wrong on the next)."""

import functools
import platform
import re
from pathlib import Path
from typing import Dict, List


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """E.g. 'AMD EPYC' or 'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz'."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The CPU's feature flags (x86: avx2, avx512f, avx512_bf16, amx_tile, ...), sorted."""
    info = _cpuinfo()
    return sorted((info.get("flags") or info.get("Features") or "").split())


def cpu_slug() -> str:
    """The CPU model as a file-name part, e.g. 'amd-epyc'."""
    return re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "unknown-cpu"
