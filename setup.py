"""Builds the native core, engine._native, from native/*.pyx, and the spawn helper,
engine/_spawn, from native/spawn/; pyproject.toml has the rest.

STOKER_NATIVE=0 installs without it (engine/native.py then uses its pure-Python twin).
Cython writes its C files under build/ (and rebuilds them when any .pyx, .pxi or .pxd
they include changes), so the source tree stays clean.
"""

import os
import subprocess

from setuptools import Distribution, Extension, setup
from setuptools.command.build_ext import build_ext

SPAWN_SOURCE = "native/spawn/stoker_spawn.c"


class build_with_spawn(build_ext):
    """Also builds engine/_spawn, the executable that starts every action (native/spawn/):
    a program, not an extension, so it is compiled here and placed beside engine._native."""

    def run(self) -> None:
        super().run()
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("engine._native")),
                              "_spawn")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        cc = os.environ.get("CC", "cc")
        # Static: it is exec'd once per action, and a static program skips the dynamic
        # loader (measured: ~5% more actions/s), and needs no libseccomp at run time.
        subprocess.check_call([cc, "-O2", "-Wall", "-static", "-o", target, SPAWN_SOURCE,
                               "-lseccomp"])


class WithSpawn(Distribution):
    def has_ext_modules(self) -> bool:
        return True  # the spawn helper is built even without the native core


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


setup(ext_modules=native_extensions(), cmdclass={"build_ext": build_with_spawn},
      distclass=WithSpawn)
