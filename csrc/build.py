"""How the C++ kernels are compiled: one description for ``setup.py`` (ahead of time) and for the
runtime's ninja build on first use (``fastprompt.attention.cpu_backend``). Needs only torch."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

# Two translation units, so that ninja compiles them in parallel on a first-use build.
SOURCES = ("prefix_attention_forward.cpp", "prefix_attention_backward.cpp")
HEADERS = ("prefix_attention.h",)
# What the first-use message promises, measured on two cores of a shared machine.
EXPECTED_SECONDS = "10-60"
PREBUILT_NAME = "_prefix_attention_cpu"  # fastprompt/csrc/_prefix_attention_cpu*.so, built by setup.py
STAMP = PREBUILT_NAME + ".json"  # beside it: what it was built for


def isa_flags() -> tuple[str, list[str]]:
    """(name, compiler flags) for the widest vector ISA torch reports for this machine.

    The kernels use ``at::vec::Vectorized``, whose width follows the ``CPU_CAPABILITY_*`` macro.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "avx512", [
            "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
        ]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return "default", []


def build_flags() -> tuple[str, list[str], list[str]]:
    """(isa name, cflags, ldflags)."""
    isa, flags = isa_flags()
    cflags = ["-O3", *flags]
    ldflags: list[str] = []
    # at::parallel_for is OpenMP inside torch's headers: without -fopenmp the kernels run on one thread.
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return isa, cflags, ldflags


def source_digest(csrc_dir: Path) -> str:
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update((csrc_dir / source).read_bytes())
    return digest.hexdigest()[:12]


def stamp(csrc_dir: Path) -> dict[str, str]:
    """What a build is for: a prebuilt library is used only where this is equal."""
    return {"torch": torch.__version__, "isa": isa_flags()[0], "sources": source_digest(csrc_dir)}


def write_stamp(csrc_dir: Path, out_dir: Path) -> None:
    (out_dir / STAMP).write_text(json.dumps(stamp(csrc_dir), sort_keys=True) + "\n")
