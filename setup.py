"""Build the compiled core of the Calejo Control Adapter.

Metadata lives in pyproject.toml; this file only declares the extensions.

Set ``CALEJO_DEBUG_BUILD=1`` to build with bounds and wraparound checks,
line tracing and no optimisation, for the tests and for debuggers.
"""

from __future__ import annotations

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ("gate", "codecs", "modbus", "filesync")

DEBUG = os.environ.get("CALEJO_DEBUG_BUILD", "") not in ("", "0")

if DEBUG:
    directives = {
        "boundscheck": True,
        "wraparound": True,
        "initializedcheck": True,
        "linetrace": True,
        "profile": True,
    }
    macros = [
        ("CYTHON_TRACE", "1"),
        ("CYTHON_TRACE_NOGIL", "1"),
        ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
    ]
    cflags = ["-O0", "-g3", "-UNDEBUG"]
else:
    directives = {}
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    cflags = ["-O3"]

# No fused multiply-add: the compiled core rounds every product and sum
# exactly as the pure-Python reference does, on every architecture.
cflags.append("-ffp-contract=off")

extensions = [
    Extension(
        f"calejo_core.{name}",
        [f"calejo_core/{name}.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=macros,
        extra_compile_args=cflags,
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", **directives},
        # The debug build translates into its own folder, so neither
        # build ever reuses the other's C files.
        build_dir=".debug-build/c" if DEBUG else None,
    ),
)
