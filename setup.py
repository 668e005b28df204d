"""Builds the op library with CMake and installs it inside the dpn_fast package.

Environment:
  DPN_FAST_CPU_ONLY=1        build without CUDA even when nvcc is found (a CUDA build also
                             compiles the Triton kernels into cubins: it needs triton)
  DPN_FAST_CUDA_ARCHS="80;90" CUDA architectures (CMake syntax); default: those of
                             75, 80, 86, 89, 90 that the local nvcc accepts, plus PTX of the newest
  CUDA_HOME                  toolkit root (default: found from nvcc on PATH)
  DPN_FAST_BUILD_JOBS        parallel compile jobs (default: CPU count)
  DPN_FAST_PORTABLE=1        compile the CPU kernels without -march=native (for wheels)
  DPN_FAST_WERROR=1          fail on a compiler warning in dpn_fast's own sources (CI sets it)
  DPN_FAST_ONEDNN_INCLUDE    oneDNN 3.x headers (default: the onednn-devel-cpu-gomp build
                             requirement's; the library itself is Paddle's libdnnl.so.3)
"""
import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
from dpn_fast_build import (RECORD_NAME, find_nvcc,  # noqa: E402
                            paddle_runtime_requirement, write_build_record)
DEFAULT_ARCHS = (75, 80, 86, 89, 90)
# Headers of a oneDNN 3.x release (the C API is stable within 3.x); the code links the oneDNN that
# the Paddle wheel ships (paddle/libs/libdnnl.so.3), which has no real headers of its own.
ONEDNN_HEADERS = "onednn-devel-cpu-gomp==2023.2.0"


def supported_archs(nvcc):
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                         check=True).stdout
    return {int(line.split("_")[1]) for line in out.split() if line.startswith("compute_")}


def cuda_archs(nvcc):
    if os.environ.get("DPN_FAST_CUDA_ARCHS"):
        return os.environ["DPN_FAST_CUDA_ARCHS"]
    archs = sorted(a for a in DEFAULT_ARCHS if a in supported_archs(nvcc))
    if not archs:
        raise RuntimeError(f"{nvcc} supports none of sm_{DEFAULT_ARCHS}; set DPN_FAST_CUDA_ARCHS")
    # SASS for each arch, PTX of the newest so later GPUs can JIT it.
    return ";".join([f"{a}-real" for a in archs[:-1]] + [str(archs[-1])])


def onednn_include():
    """oneDNN headers for building against Paddle's libdnnl.so.3: DPN_FAST_ONEDNN_INCLUDE, else
    those of the onednn-devel-cpu-gomp build requirement."""
    if os.environ.get("DPN_FAST_ONEDNN_INCLUDE"):
        return os.environ["DPN_FAST_ONEDNN_INCLUDE"]
    from importlib import metadata

    try:
        files = metadata.files(ONEDNN_HEADERS.split("==")[0]) or []
    except metadata.PackageNotFoundError:
        files = []
    for path in files:
        if str(path).endswith("include/oneapi/dnnl/dnnl.hpp"):
            return os.path.dirname(os.path.dirname(os.path.dirname(path.locate())))
    raise RuntimeError(f"oneDNN headers not found: pip install '{ONEDNN_HEADERS}' (pip install . "
                       "does so itself) or set DPN_FAST_ONEDNN_INCLUDE")


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # A plain name: the library is loaded by path, not imported as a Python module.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        import paddle

        paddle_root = os.path.dirname(paddle.__file__)
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        args = [f"-DPADDLE_ROOT={paddle_root}", "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-DONEDNN_INCLUDE_DIR={onednn_include()}"]
        if os.environ.get("DPN_FAST_PORTABLE") == "1":
            args.append("-DDPN_FAST_NATIVE=OFF")
        if os.environ.get("DPN_FAST_WERROR") == "1":
            args.append("-DDPN_FAST_WERROR=ON")
        nvcc = find_nvcc()
        if nvcc:
            nvcc = os.path.realpath(nvcc)
            # nvcc may be a wrapper script; resolve the toolkit from what it execs.
            with open(nvcc, "rb") as f:
                head = f.read(256)
            if head.startswith(b"#!"):
                for token in head.decode(errors="ignore").split():
                    if token.endswith("/nvcc") and os.path.exists(token):
                        nvcc = token
            args += ["-DDPN_FAST_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs(nvcc)}"]
            print(f"dpn_fast: building CUDA kernels with {nvcc}", flush=True)
        else:
            args.append("-DDPN_FAST_WITH_CUDA=OFF")  # also where a reused build dir had it on
            print("dpn_fast: CPU-only build (no nvcc, or DPN_FAST_CPU_ONLY=1)", flush=True)
        # pip shows this (and the compiler's output) only with -v; README says so.
        print("dpn_fast: compiling the op library; about 1.5-3 minutes on 2 cores, longer with "
              "CUDA", flush=True)
        start = time.monotonic()
        subprocess.run(["cmake", "-S", ROOT, "-B", build_dir, *args], check=True)
        jobs = os.environ.get("DPN_FAST_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", build_dir, "--target", "dpn_fast_ops", "-j", jobs],
                       check=True)
        print(f"dpn_fast: op library built in {time.monotonic() - start:.0f} s", flush=True)
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(build_dir, "libdpn_fast_ops.so"), target)
        write_build_record(os.path.dirname(target))

    def copy_extensions_to_source(self):
        """--inplace (and editable installs): the library's build record goes along with it."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace, built = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(os.path.join(os.path.dirname(built), RECORD_NAME),
                           os.path.join(os.path.dirname(inplace), RECORD_NAME))


setup(
    # The Paddle distribution built against (paddlepaddle-gpu, say), never a second one over it.
    install_requires=["numpy", "pillow", paddle_runtime_requirement()],
    packages=["dpn_fast", "dpn_fast.data", "dpn_fast.engines", "dpn_fast.models", "dpn_fast.ops",
              "dpn_fast.kernels"],
    package_data={"dpn_fast.data": ["*.txt", "*.jpg"], "dpn_fast.kernels": ["*.json"]},
    ext_modules=[Extension("dpn_fast.libdpn_fast_ops", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
