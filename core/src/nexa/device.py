"""Device detection: cuda, metal or cpu, without importing torch or any backend library."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from nexa.types import Device

DEVICE_KINDS = ("cuda", "metal", "cpu")


def _cpu() -> Device:
    name = platform.processor() or platform.machine()
    memory = 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return Device("cpu", name, memory)


def _cuda() -> Device | None:
    # nvidia-smi answers in ~50 ms and needs no Python CUDA library.
    smi = shutil.which("nvidia-smi")
    if not smi or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, _, mib = out.splitlines()[0].partition(",")
    try:
        memory = int(float(mib.strip())) * 1024 * 1024
    except ValueError:
        memory = 0
    return Device("cuda", name.strip(), memory)


def _metal() -> Device | None:
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        cpu = _cpu()
        return Device("metal", "Apple Silicon", cpu.memory_bytes)
    return None


def detect_device(override: str | None = None) -> Device:
    """The best device here, or the one named by ``override`` (``--device``/``NEXA_DEVICE``)."""
    wanted = override or os.environ.get("NEXA_DEVICE") or None
    if wanted is not None:
        wanted = {"mps": "metal", "gpu": "cuda"}.get(wanted, wanted)
        if wanted not in DEVICE_KINDS:
            raise ValueError(f"unknown device {wanted!r}; choose one of {', '.join(DEVICE_KINDS)}")
        found = {"cuda": _cuda, "metal": _metal, "cpu": _cpu}[wanted]()
        return found or Device(wanted, "forced", 0)
    return _cuda() or _metal() or _cpu()
