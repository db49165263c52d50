"""Build rho_kernels and its extension rho_kernels._C (csrc/).

Environment switches (read at build time):
  RHO_KERNELS_NO_EXT=1       build no extension at all; the package runs on the reference
                             (and Triton where it runs).
  RHO_KERNELS_SKIP_CUDA=1    build the CPU kernels only, even where CUDA is present.
  RHO_KERNELS_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU.
  TORCH_CUDA_ARCH_LIST       architectures for the CUDA kernels; setting it also enables the
                             CUDA build on a GPU-less machine (CI uses "8.0;9.0").
  RHO_KERNELS_CPU_ARCH       -march for the CPU kernels (default "native": the build machine's
                             instruction set, AVX2/AVX-512 where present).  Use e.g.
                             "x86-64-v3" to build for other machines.
  MAX_JOBS                   parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extension_modules():
    if flag("RHO_KERNELS_NO_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = not flag("RHO_KERNELS_SKIP_CUDA") and (
        flag("RHO_KERNELS_FORCE_CUDA") or torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    )
    if want_cuda and CUDA_HOME is None:
        print("rho_kernels: CUDA requested but no CUDA toolkit found; building CPU kernels only", file=sys.stderr)
        want_cuda = False
    if want_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    march = os.environ.get("RHO_KERNELS_CPU_ARCH", "native")
    # Our own sources must compile warning-free (tests/test_build.py reads the build log).
    cxx = ["-O3", f"-march={march}", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []  # BuildExtension passes -DPy_LIMITED_API itself for py_limited_api=True
    if want_cuda:
        # torch's CUDA headers include cuSPARSE/cuBLAS headers, which pip ships under nvidia/.
        for site in sys.path:
            for sub in ("nvidia/cu13/include", "nvidia/cusparse/include", "nvidia/cublas/include"):
                path = os.path.join(site, sub)
                if os.path.isdir(path):
                    include_dirs.append(path)
        # -Xptxas=-v: per-kernel registers / spills / shared memory in the build log, read by
        # tests/test_build.py and benchmarks/triton_aot.py.
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-Xcompiler=-Wall",
                "-Xptxas=-warn-spills", "-Xptxas=-v", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "rho_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("RHO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "rho_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="rho_kernels",
    version="0.1.0",
    description="Fused score + top-k kernels for online batch selection (RHO-LOSS, Rho-1)",
    packages=find_packages(include=["rho_kernels", "rho_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "train": ["tqdm", "safetensors"], "test": ["pytest"]},
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
