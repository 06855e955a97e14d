"""The package's build, beside pyproject.toml: it also compiles the spawner in C
(gsrv/spawn/spawner.c) into gsrv/spawn/gsrv-spawner, for a wheel and an editable install
alike. Without a C compiler, or with GSRV_BUILD_SPAWNER=0, it builds nothing more and gsrv
runs its Python spawner (`[server] spawner = "auto"`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCE = os.path.join("gsrv", "spawn", "spawner.c")
PROGRAM = "gsrv-spawner"


class BuildWithSpawner(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        if os.environ.get("GSRV_BUILD_SPAWNER", "1") == "0":
            print("gsrv: GSRV_BUILD_SPAWNER=0: the spawner in C is not built", file=sys.stderr)
            return
        editable = getattr(self, "editable_mode", False)
        where = os.path.join("gsrv", "spawn") if editable else os.path.join(self.build_lib, "gsrv", "spawn")
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            print("gsrv: no C compiler: the spawner in C is not built (gsrv runs its Python one)", file=sys.stderr)
            return
        os.makedirs(where, exist_ok=True)
        target = os.path.join(where, PROGRAM)
        made = subprocess.run([compiler, "-O2", "-Wall", "-o", target + ".new", SOURCE, "-lm"], check=False)
        if made.returncode != 0:
            print(f"gsrv: {compiler} failed: the spawner in C is not built (gsrv runs its Python one)", file=sys.stderr)
            return
        os.chmod(target + ".new", 0o755)
        os.replace(target + ".new", target)


setup(cmdclass={"build_py": BuildWithSpawner})
