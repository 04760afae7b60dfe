"""Builds the optional CPU kernel ``cogvlm_jax._int8_cpu`` (``csrc/int8_cpu.cc``); pyproject.toml has the rest.

The kernel is an XLA FFI handler library (loaded with ctypes by ``cogvlm_jax/models/int8_cpu.py``), compiled
against the FFI headers jaxlib ships (``jax.ffi.include_dir()``). It is optional: where there is no C++
compiler or the build fails, the install still succeeds with a warning, and quantized products run as XLA
ops (``int8_cpu.applies`` is False without the library).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _ffi_include_dir() -> str:
    """``jax.ffi.include_dir()``: jaxlib's ``include`` folder (the build environment has jaxlib, not jax)."""
    import jaxlib

    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    if not os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
        raise FileNotFoundError(f"no xla/ffi/api/ffi.h under {include}")
    return include


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed build instead of failing the install."""

    def finalize_options(self):
        super().finalize_options()
        try:
            include = _ffi_include_dir()
        except Exception as e:  # no jaxlib in the build environment: nothing to build against
            self._skip = f"jaxlib's FFI headers are unavailable ({e})"
            return
        self._skip = None
        for ext in self.extensions:
            ext.include_dirs.append(include)

    def run(self):
        if self._skip:
            self._warn(self._skip)
            return
        try:
            super().run()
        except Exception as e:
            self._warn(str(e))

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self._warn(str(e))

    @staticmethod
    def _warn(why):
        sys.stderr.write(f"WARNING: the CPU int8/int4 kernel was not built ({why}); quantized products run "
                         "as XLA ops\n")


setup(
    ext_modules=[Extension(
        "cogvlm_jax._int8_cpu",
        sources=["csrc/int8_cpu.cc"],
        language="c++",
        # no -march: the kernel picks AVX-512 / AVX2 / baseline code at load time (target_clones)
        extra_compile_args=["-O3", "-std=c++17", "-Wno-attributes", "-Wno-return-type"],
        optional=True,
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
