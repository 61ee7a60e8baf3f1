"""Build script: the package metadata lives in pyproject.toml; this file only adds the C++ kernels.

When torch is importable at build time (``pip install --no-build-isolation .``, or a wheel built where
torch is installed), the kernels of ``csrc/`` are compiled ahead of time with torch's extension builder
into ``fastprompt/csrc/_prefix_attention_cpu*.so``, with a stamp of the torch version, instruction set
and sources they were built for. Otherwise (pip's isolated build, which never installs torch) nothing is
compiled and the runtime builds the kernels with ninja on first use.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup

CSRC = Path(__file__).resolve().parent / "csrc"


def _build_description():
    """``csrc/build.py`` loaded from its file: the package itself is not importable while it is being built."""
    spec = importlib.util.spec_from_file_location("fastprompt_csrc_build", CSRC / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpp_extension() -> dict:
    if importlib.util.find_spec("torch") is None:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    build = _build_description()
    _, cflags, ldflags = build.build_flags()

    class BuildWithStamp(BuildExtension):
        def run(self) -> None:
            super().run()
            for ext in self.extensions:
                build.write_stamp(CSRC, Path(self.get_ext_fullpath(ext.name)).parent)

    extension = CppExtension(
        name="fastprompt.csrc." + build.PREBUILT_NAME,
        sources=[str(Path("csrc") / source) for source in build.SOURCES],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildWithStamp.with_options(use_ninja=True)}}


setup(**_cpp_extension())
