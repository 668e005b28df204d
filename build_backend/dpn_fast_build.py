"""The package's PEP 517 build backend: setuptools.build_meta, with the Paddle dependency chosen
from the Paddle the user has instead of a fixed `paddlepaddle` pin.

Paddle ships as several distributions that all install the same `paddle` package
(`paddlepaddle`, the CPU wheel on PyPI; `paddlepaddle-gpu` and others from Paddle's own index).
A fixed `paddlepaddle==3.3.1` requirement makes pip install the CPU wheel over a GPU user's
Paddle, and builds the op library against a libpaddle that is not the one it will run with. So:

- build requirements (get_requires_for_build_wheel): nothing for Paddle where the build's Python
  already sees one (`pip install --no-build-isolation .`: the user's Paddle); else, in pip's
  isolated build environment, the CPU wheel at the version installed where the package is going
  (the interpreter's site-packages, which pip hides from the build but does not move), or
  DEFAULT_PADDLE_VERSION on a machine with no Paddle. An isolated build for a Paddle that is not
  the CPU wheel stops with the command that builds against it: it cannot be fetched from PyPI.
- run-time requirement (setup.py's install_requires): the distribution and version the op
  library was built against, so pip keeps the installed Paddle rather than replacing it.

A CUDA build (nvcc found, DPN_FAST_CPU_ONLY unset) also requires Triton, which compiles the
channels-last kernels into the library (build_backend/aot_cubins.py).

setup.py also records that Paddle next to the library (write_build_record), which
dpn_fast/_extension.py compares with the Paddle found at import.
"""
import json
import os
import re
import shutil
import site
import sys
import sysconfig
from importlib import metadata

from setuptools import build_meta
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not overridden here)

CPU_DISTRIBUTION = "paddlepaddle"
DEFAULT_PADDLE_VERSION = "3.3.1"
RECORD_NAME = "libdpn_fast_ops.build.json"
# The Triton a CUDA build compiles its embedded kernels with (the [triton] extra's).
TRITON_REQUIREMENT = "triton>=3.4"


class PaddleBuildError(RuntimeError):
    pass


def normalize(name):
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def find_paddle(path=None):
    """(distribution name, version) of the installed distribution that provides the `paddle`
    package, looking in `path` (a list of directories; default sys.path), or None."""
    for dist in metadata.distributions(path=sys.path if path is None else path):
        # RECORD's text rather than dist.files: a site-packages holds hundreds of distributions
        if "\npaddle/__init__.py," in "\n" + (dist.read_text("RECORD") or ""):
            return dist.metadata["Name"], dist.version
    return None


def target_site_dirs():
    """The site-packages of the interpreter running the build (a venv's own first, then its base
    interpreter's where it sees them), and the user's: the directories that pip's isolated build
    environment takes off sys.path, where the user's Paddle lies."""
    if hasattr(site, "getsitepackages"):
        dirs = site.getsitepackages()
    else:  # an old virtualenv's site.py, as pip's own fallback
        paths = sysconfig.get_paths()
        dirs = [paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def paddle_build_requirements(build_path=None, target_path=None):
    """The Paddle requirement of the build environment (see the module's docstring): [] or
    ["paddlepaddle==<version>"]."""
    if find_paddle(build_path) is not None:
        return []
    installed = find_paddle(target_site_dirs() if target_path is None else target_path)
    if installed is None:
        return [f"{CPU_DISTRIBUTION}=={DEFAULT_PADDLE_VERSION}"]
    name, version = installed
    if normalize(name) != CPU_DISTRIBUTION:
        raise PaddleBuildError(
            f"dpn_fast: {name} {version} is installed; the op library must be built against it, "
            f"and an isolated build cannot fetch it from PyPI. Build in this environment "
            f"instead:\n    pip install --no-build-isolation .\n(install its build tools first: "
            f"pip install setuptools wheel cmake onednn-devel-cpu-gomp==2023.2.0)")
    return [f"{CPU_DISTRIBUTION}=={version}"]


def paddle_runtime_requirement(path=None):
    """`<distribution>==<version>` of the Paddle this build compiles against (the CPU default
    where none is installed, as when metadata is made before the build environment has one)."""
    name, version = find_paddle(path) or (CPU_DISTRIBUTION, DEFAULT_PADDLE_VERSION)
    return f"{name}=={version}"


def build_record():
    """What identifies the Paddle that the op library is compiled against (imports paddle)."""
    import paddle

    name, _ = find_paddle() or (None, None)
    return {"distribution": name, "version": paddle.version.full_version,
            "commit": paddle.version.commit, "cuda": paddle.version.cuda()}


def write_build_record(library_dir):
    with open(os.path.join(library_dir, RECORD_NAME), "w") as f:
        json.dump(build_record(), f, indent=1)


def find_nvcc():
    """nvcc of CUDA_HOME, else on PATH; None when CUDA is turned off (DPN_FAST_CPU_ONLY=1) or
    absent: the build is then CPU-only."""
    if os.environ.get("DPN_FAST_CPU_ONLY") == "1":
        return None
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_build_requirements():
    """A CUDA build compiles the Triton kernels ahead of time (build_backend/aot_cubins.py), so
    it needs Triton; a CPU-only build needs nothing."""
    return [TRITON_REQUIREMENT] if find_nvcc() else []


def get_requires_for_build_wheel(config_settings=None):
    return (build_meta.get_requires_for_build_wheel(config_settings)
            + paddle_build_requirements() + cuda_build_requirements())


def get_requires_for_build_editable(config_settings=None):
    return (build_meta.get_requires_for_build_editable(config_settings)
            + paddle_build_requirements() + cuda_build_requirements())
