"""Build of the compiled parts of moe_kernels (package metadata lives in pyproject.toml).

* ``moe_kernels._C`` (always): the CPU kernels (csrc/cpu/*.cpp) and the module's typed op calls
  and CPU queries (csrc/ops.cpp). The op schemas are not compiled: moe_kernels/_schemas.py holds
  them and moe_kernels/_registry.py defines them at import.
* ``moe_kernels._C_cuda`` (CUDA kernels, csrc/cuda/*.cu): built when torch is a CUDA build and nvcc
  is found, or when ``MOE_KERNELS_BUILD_CUDA=1`` (then failing loudly if impossible);
  ``MOE_KERNELS_BUILD_CUDA=0`` skips it.  Follows ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``).

Build with ``pip install --no-build-isolation .``: the build imports the installed torch.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_home() -> str | None:
    """The CUDA root: $CUDA_HOME, else the folder of the *real* nvcc (PATH may hold a wrapper)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.realpath(cand)
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _want_cuda(torch) -> bool:
    flag = os.environ.get("MOE_KERNELS_BUILD_CUDA", "").strip()
    cu_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if flag == "0":
        return False
    possible = torch.version.cuda is not None and _cuda_home() is not None and bool(cu_sources)
    if flag == "1" and not possible:
        sys.exit(
            "MOE_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={_cuda_home()!r}, "
            f"{len(cu_sources)} .cu sources"
        )
    return possible


def _cutlass_include() -> str:
    """CUTLASS's headers, from the installed ``nvidia-cutlass`` package (``cutlass_library``)."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")  # located, not imported
    if spec is None or not spec.origin:
        sys.exit(
            "the CUDA extension needs CUTLASS's headers: pip install nvidia-cutlass "
            "(or set MOE_KERNELS_BUILD_CUDA=0 to build without CUDA)"
        )
    inc = os.path.join(os.path.dirname(spec.origin), "source", "include")
    if not os.path.exists(os.path.join(inc, "cutlass", "cutlass.h")):
        sys.exit(f"nvidia-cutlass is installed but {inc} holds no cutlass/cutlass.h")
    return inc


def extensions():
    import torch

    want_cuda = _want_cuda(torch)
    if want_cuda:
        # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import, and
        # would otherwise guess the root from the first nvcc on PATH (possibly a wrapper script)
        os.environ["CUDA_HOME"] = _cuda_home()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", "-DNDEBUG"]
    exts = [
        CppExtension(
            "moe_kernels._C",
            sources=_rel(
                [os.path.join(ROOT, "csrc", "ops.cpp")]
                + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
            ),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        # The minimal CUDA install lacks cusparse/cublas headers that ATen/cuda includes; the
        # nvidia wheels that the CUDA build of torch depends on ship them.
        site = sysconfig.get_paths()["purelib"]
        incs = (
            [os.path.join(ROOT, "csrc")]
            + glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
            + [_cutlass_include()]
        )
        exts.append(
            CUDAExtension(
                "moe_kernels._C_cuda",
                sources=_rel(
                    glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                    # the CUTLASS grouped GEMM instantiations, one per file
                    + glob.glob(os.path.join(ROOT, "csrc", "cuda", "cutlass", "*.cu"))
                    + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
                ),
                include_dirs=incs,
                extra_compile_args={
                    "cxx": cxx,
                    "nvcc": [
                        "-O3",
                        "-DNDEBUG",
                        "-std=c++20",
                        "-Xptxas",
                        "-warn-spills",
                        "--expt-relaxed-constexpr",
                    ],
                },
            )
        )
    return exts


def write_build_info() -> None:
    """moe_kernels/_build_info.py (gitignored): the commit of the checkout being built, for
    ``moe-bench``'s ``git_commit``; ``-dirty`` when tracked files differ from it. Nothing is
    written outside a git checkout (an sdist), where the field stays empty."""
    import subprocess

    def git(*args):
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git
        return
    if not commit:
        return
    if dirty:
        commit += "-dirty"
    with open(os.path.join(ROOT, "moe_kernels", "_build_info.py"), "w") as f:
        f.write(f'"""Written by setup.py at build time."""\n\nGIT_COMMIT = {commit!r}\n')


def build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


write_build_info()
setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_cls()})
