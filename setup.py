"""Builds the native core, engine._native, from native/*.pyx; pyproject.toml has the rest.

STOKER_NATIVE=0 installs without it (engine/native.py then uses its pure-Python twin).
Cython writes its C files under build/ (and rebuilds them when any .pyx, .pxi or .pxd
they include changes), so the source tree stays clean.
"""

import os

from setuptools import Extension, setup


def native_extensions() -> list:
    if os.environ.get("STOKER_NATIVE", "1") == "0":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        raise SystemExit("building the native core needs Cython>=3.0 (it is in pyproject.toml's "
                         "[build-system] requires; without build isolation, pip install "
                         "'cython>=3.0,<3.4'), or set STOKER_NATIVE=0 to install without it") \
            from None

    ext = Extension(
        "engine._native",
        ["native/_native.pyx"],
        libraries=["crypto"],
        extra_compile_args=["-O3"],
    )
    return cythonize(
        [ext],
        include_path=["native"],
        build_dir="build/cython",
        compiler_directives={"language_level": 3},
        quiet=True,
    )


setup(ext_modules=native_extensions())
