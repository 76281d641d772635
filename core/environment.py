"""What a trial's numbers depend on beyond its config and seed: the machine, the torch build, the kernels,
the thread count and the precision. Recorded with every result (result.json "environment") and part of
every cache key whose contents are floats (core.trial's warm-up cache).
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import torch

from core.config import Config
from core.records import EnvironmentRecord
from core.train import bf16_active


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# Environment variables that cap the ISA of the libraries under torch (oneDNN's convolutions, MKL's BLAS):
# with them a Xeon computes closer to what a CPU without AVX512 computes (bench_smoke's onednn-avx2 path),
# so they change a trial's floats as much as ATen's own ATEN_CPU_CAPABILITY (recorded as cpu_capability).
KERNEL_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def kernel_caps(environ: Mapping[str, str] = os.environ) -> str:
    """The ISA caps set in an environment (this process's unless given), "VAR=VALUE ..." ("" when none:
    each library's own dispatch for this CPU)."""
    return " ".join(f"{v}={environ[v]}" for v in KERNEL_CAP_VARS if environ.get(v))


def environment(device: torch.device, cfg: Config | None = None) -> EnvironmentRecord:
    """What a result's numbers depend on beyond config and seed: bit-identical results need the same
    torch build, CPU (or GPU) kernels, intra-op thread count and precision (bf16 autocast or fp32)."""
    env: EnvironmentRecord = {
        "precision": "bf16" if cfg is not None and bf16_active(cfg, device) else "fp32",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_caps": kernel_caps(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return env


def numerics_fingerprint(device: torch.device, cfg: Config) -> str:
    """Cache-key part for what makes float results differ at equal config and seed: a warm-up trained with
    other kernels or another thread count would make a trial differ from the same trial run cold."""
    env = environment(device, cfg)  # precision: train.cpu_amp=auto is bf16 on one CPU and fp32 on another
    # The CPU model too: oneDNN picks its kernels by the CPU's features, not by ATen's kernel level, so an AMD
    # EPYC and a Xeon that both report AVX512 (a runs/ folder shared by a Ray cluster) compute other floats.
    kernels = env["gpu"] or f"{env['cpu']}|{env['cpu_capability']}"
    parts = [env["torch"], env["device"], kernels, str(env["threads"]), env["precision"], env["kernel_caps"]]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8]
