"""Build rho_kernels and its extension rho_kernels._C (csrc/).

Environment switches (read at build time):
  RHO_KERNELS_NO_EXT=1       build no extension at all; the package runs on the reference
                             (and Triton where it runs).
  RHO_KERNELS_SKIP_CUDA=1    build the CPU kernels only, even where CUDA is present.
  RHO_KERNELS_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU.
  TORCH_CUDA_ARCH_LIST       architectures for the CUDA kernels; setting it also enables the
                             CUDA build on a GPU-less machine (CI uses "8.0;9.0").
  RHO_KERNELS_CPU_ARCH       -march for the CPU sources other than the per-ISA scoring kernels
                             (default: the compiler's, i.e. a portable build).  The scoring
                             kernel is always built per instruction set (see cpu_isa_variants).
  MAX_JOBS                   parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cpu_isa_variants() -> list[tuple[str, list[str]]]:
    """The CPU scoring kernel's builds: (csrc/cpu/isa/score_cpu_<name>.cpp, extra compiler flags).

    Each instruction set gets its own translation unit and flags; select_cpu.cpp picks the best
    one the running CPU supports (RHO_KERNELS_CPU_ISA asks for a lower one).  Off x86-64 only the
    baseline variant is built.
    """
    variants = [("scalar", [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        variants += [("avx2", ["-march=x86-64-v3"]), ("avx512", ["-march=x86-64-v4"])]
    return variants


def _build_ext_class(base):
    """`base` (torch's BuildExtension) that also compiles the per-ISA kernel sources, each with its
    own flags, and links their objects into the extension (setuptools has no per-file flags)."""

    class BuildExtensionWithIsas(base):
        def build_extension(self, ext):
            for src, flags in getattr(ext, "isa_sources", []):
                args = ext.extra_compile_args
                args = {**args, "cxx": args["cxx"] + flags} if isinstance(args, dict) else args + flags
                ext.extra_objects += self.compiler.compile(
                    [src], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args)
            super().build_extension(ext)

    return BuildExtensionWithIsas


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

    march = os.environ.get("RHO_KERNELS_CPU_ARCH")
    # Our own sources must compile warning-free (tests/test_build.py reads the build log).
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"] + ([f"-march={march}"] if march else [])
    include_dirs = [os.path.join(ROOT, "csrc")]
    isas = cpu_isa_variants()
    # BuildExtension passes -DPy_LIMITED_API itself for py_limited_api=True.
    define_macros = [(f"RHO_CPU_HAVE_{name.upper()}", "1") for name, _ in isas if name != "scalar"]
    if want_cuda:
        # torch's CUDA headers include cuSPARSE/cuBLAS headers, which pip ships under nvidia/.
        for site in sys.path:
            for sub in ("nvidia/cu13/include", "nvidia/cusparse/include", "nvidia/cublas/include"):
                path = os.path.join(site, sub)
                if os.path.isdir(path):
                    include_dirs.append(path)
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-Xcompiler=-Wall",
                "-Xptxas=-warn-spills", "--expt-relaxed-constexpr"]
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
    ext.isa_sources = [(f"csrc/cpu/isa/score_cpu_{name}.cpp", flags) for name, flags in isas]
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


ext_modules, cmdclass = extension_modules()

setup(
    name="rho_kernels",
    version="0.1.0",
    description="Fused score + top-k kernels for online batch selection (RHO-LOSS, Rho-1)",
    packages=find_packages(include=["rho_kernels", "rho_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "train": ["tqdm", "safetensors"], "test": ["pytest"]},
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
