"""PEP 517 backend: setuptools, plus the torch already installed in the target environment.

axpo._C must be compiled against the torch the user runs (CPU build, or the CUDA build that
matches their driver), so torch cannot be a build requirement: pip would put some other torch
(often a multi-GB CUDA build) into the isolated build environment. Instead, this backend finds
the torch of the interpreter running the build and appends its site-packages to sys.path, so a
plain `pip install -e .` works. `--no-build-isolation` keeps working too.
"""
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403


def _expose_installed_torch() -> None:
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    # pip isolates the build through PYTHONPATH / PYTHONNOUSERSITE; without them the same
    # interpreter sees its own site-packages again.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = subprocess.run(
        [sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
        env=env, capture_output=True, text=True,
    )
    if probe.returncode == 0 and probe.stdout.strip():
        sys.path.append(probe.stdout.strip())


def _wrap(name):
    hook = getattr(_setuptools, name)

    def wrapped(*args, **kwargs):
        _expose_installed_torch()
        return hook(*args, **kwargs)

    wrapped.__name__ = name
    return wrapped


build_wheel = _wrap("build_wheel")
build_editable = _wrap("build_editable")
get_requires_for_build_wheel = _wrap("get_requires_for_build_wheel")
get_requires_for_build_editable = _wrap("get_requires_for_build_editable")
prepare_metadata_for_build_wheel = _wrap("prepare_metadata_for_build_wheel")
prepare_metadata_for_build_editable = _wrap("prepare_metadata_for_build_editable")
