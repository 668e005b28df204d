"""Which Paddle the package builds against and depends on (build_backend/dpn_fast_build.py), and
the error at import when the Paddle found is not the one the op library was built against.

No GPU wheel is needed: stand-in distributions (a dist-info with METADATA and a RECORD listing
paddle/__init__.py) play the installed Paddle."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from dpn_fast import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
import dpn_fast_build  # noqa: E402

# The build backend reads the source tree: the installed package's tests cannot run these.
needs_source = pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "setup.py")),
                                  reason="needs the source tree")


def stand_in(site, name, version, provides_paddle=True):
    """A distribution `name` `version` installed in the directory `site`; returns `site`."""
    info = os.path.join(site, f"{name.replace('-', '_')}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    module = "paddle" if provides_paddle else name.replace("-", "_")
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.write(f"{module}/__init__.py,,\n")
    return str(site)


@pytest.fixture
def gpu_site(tmp_path):
    """paddlepaddle-gpu 3.3.1, beside paddle2onnx (whose name starts with paddle but which does
    not provide the paddle package)."""
    stand_in(tmp_path, "paddle2onnx", "2.1.0", provides_paddle=False)
    return stand_in(tmp_path, "paddlepaddle-gpu", "3.3.1")


def test_finds_the_distribution_that_provides_paddle(gpu_site, tmp_path_factory):
    assert dpn_fast_build.find_paddle([gpu_site]) == ("paddlepaddle-gpu", "3.3.1")
    assert dpn_fast_build.find_paddle([str(tmp_path_factory.mktemp("empty"))]) is None


def test_builds_against_a_paddle_it_can_see(gpu_site):
    """--no-build-isolation: the user's Paddle is the build's; nothing is added."""
    assert dpn_fast_build.paddle_build_requirements(build_path=[gpu_site],
                                                    target_path=[gpu_site]) == []


def test_isolated_build_on_a_machine_without_paddle_takes_the_cpu_wheel(tmp_path):
    empty = [str(tmp_path)]
    assert dpn_fast_build.paddle_build_requirements(build_path=empty, target_path=empty) == [
        f"paddlepaddle=={dpn_fast_build.DEFAULT_PADDLE_VERSION}"]


def test_isolated_build_takes_the_installed_cpu_wheels_version(tmp_path):
    target = stand_in(tmp_path / "site", "paddlepaddle", "3.2.0")
    assert dpn_fast_build.paddle_build_requirements(
        build_path=[str(tmp_path / "build")], target_path=[target]) == ["paddlepaddle==3.2.0"]


def test_isolated_build_for_a_gpu_paddle_names_the_command(gpu_site, tmp_path):
    with pytest.raises(dpn_fast_build.PaddleBuildError,
                       match=r"(?s)paddlepaddle-gpu 3\.3\.1 is installed.*--no-build-isolation"):
        dpn_fast_build.paddle_build_requirements(build_path=[str(tmp_path / "build")],
                                                 target_path=[gpu_site])


def test_depends_on_the_distribution_built_against(gpu_site, tmp_path):
    assert dpn_fast_build.paddle_runtime_requirement([gpu_site]) == "paddlepaddle-gpu==3.3.1"
    cpu = stand_in(tmp_path / "cpu", "paddlepaddle", "3.3.1")
    assert dpn_fast_build.paddle_runtime_requirement([cpu]) == "paddlepaddle==3.3.1"


def test_target_site_dirs_hold_this_interpreters_paddle():
    """What pip's isolated build hides from sys.path but the backend still reads."""
    assert dpn_fast_build.find_paddle(dpn_fast_build.target_site_dirs()) is not None


def test_a_cuda_build_requires_triton_and_a_cpu_build_does_not(tmp_path, monkeypatch):
    """With nvcc the build compiles the Triton kernels into the library (aot_cubins.py)."""
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.delenv("DPN_FAST_CPU_ONLY", raising=False)
    assert dpn_fast_build.cuda_build_requirements() == [dpn_fast_build.TRITON_REQUIREMENT]
    monkeypatch.setenv("DPN_FAST_CPU_ONLY", "1")
    assert dpn_fast_build.cuda_build_requirements() == []
    monkeypatch.delenv("DPN_FAST_CPU_ONLY")
    monkeypatch.delenv("CUDA_HOME")
    assert dpn_fast_build.cuda_build_requirements() == []  # no nvcc anywhere


@needs_source
def test_wheel_metadata_requires_the_installed_gpu_paddle(gpu_site, tmp_path):
    """The real backend and setup.py, with paddlepaddle-gpu first on the build's path (as
    `pip install --no-build-isolation .` in a GPU environment): no Paddle build requirement, and
    the wheel requires paddlepaddle-gpu==3.3.1, which pip then keeps."""
    project, metadata_dir = tmp_path / "project", tmp_path / "metadata"
    os.makedirs(metadata_dir)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        os.makedirs(project, exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), project)
    shutil.copytree(os.path.join(ROOT, "build_backend"), project / "build_backend")
    for package in ("dpn_fast", "dpn_fast/data", "dpn_fast/engines", "dpn_fast/models",
                    "dpn_fast/ops", "dpn_fast/kernels"):
        os.makedirs(project / package, exist_ok=True)
    script = ("import json, sys, dpn_fast_build as b\n"
              "requires = b.get_requires_for_build_wheel()\n"
              f"info = b.prepare_metadata_for_build_wheel({str(metadata_dir)!r})\n"
              "print(json.dumps([requires, info]), file=sys.stderr)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([gpu_site, "build_backend"]))
    proc = subprocess.run([sys.executable, "-c", script], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    requires, info = json.loads(proc.stderr.strip().splitlines()[-1])
    assert not any("paddle" in r for r in requires), requires
    with open(metadata_dir / info / "METADATA") as f:
        dependencies = [line.split(":", 1)[1].strip() for line in f
                        if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(dependencies) == ["numpy", "paddlepaddle-gpu==3.3.1", "pillow"]


# ---------------------------------------------------------------------------------------------
# At import: the Paddle found against the build's record

def test_import_accepts_the_paddle_built_against():
    record = dict(_extension.running_paddle(), distribution="paddlepaddle")
    _extension.check_built_against(record, _extension.running_paddle())


@pytest.mark.parametrize("change,match", [
    (dict(version="3.2.0"), r"built against paddlepaddle-gpu 3\.2\.0 \(CUDA 12\.6 build"),
    (dict(commit="0" * 40), "commit 0000000000"),
])
def test_import_refuses_another_paddle(change, match):
    record = dict(_extension.running_paddle(), distribution="paddlepaddle-gpu", cuda="12.6",
                  **change)
    running = dict(_extension.running_paddle(), cuda="12.6")
    with pytest.raises(ImportError, match=match):
        _extension.check_built_against(record, running)


def test_import_refuses_a_cpu_build_under_gpu_paddle():
    record = dict(_extension.running_paddle(), distribution="paddlepaddle", cuda="False")
    running = dict(_extension.running_paddle(), cuda="12.6")
    with pytest.raises(ImportError, match=r"paddlepaddle 3\.3\.1 \(CPU build.*"
                                          r"imported is paddle 3\.3\.1 \(CUDA 12\.6 build"):
        _extension.check_built_against(record, running)


def test_import_refuses_a_library_without_record():
    with pytest.raises(ImportError, match="no build record.*rebuild"):
        _extension.check_built_against(None, _extension.running_paddle())


def test_importing_a_library_built_for_another_paddle_fails_clearly(tmp_path):
    """End to end: a copy of the installed package whose record names another Paddle version
    fails `import dpn_fast` with the ImportError, before the library is loaded."""
    package = tmp_path / "dpn_fast"
    shutil.copytree(_extension.PACKAGE_DIR, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    record_path = package / os.path.basename(_extension.BUILD_RECORD_PATH)
    record = json.loads(record_path.read_text())
    record["version"] = "3.0.0"
    record_path.write_text(json.dumps(record))
    proc = subprocess.run([sys.executable, "-c", "import dpn_fast"], capture_output=True,
                          text=True, timeout=300, cwd=tempfile.gettempdir(),
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 1
    assert "ImportError: dpn_fast's op library was built against" in proc.stderr
    assert "3.0.0" in proc.stderr and "--no-build-isolation" in proc.stderr
