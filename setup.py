"""Build rho_kernels and its extension rho_kernels._C (csrc/).

Environment switches (read at build time):
  RHO_KERNELS_NO_EXT=1       build no extension at all; the package runs on the reference
                             (and Triton where it runs).
  RHO_KERNELS_SKIP_CUDA=1    build the CPU kernels only, even where CUDA is present.
  RHO_KERNELS_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU.
  TORCH_CUDA_ARCH_LIST       architectures for the CUDA kernels; setting it also enables the
                             CUDA build on a GPU-less machine (CI uses "8.0;9.0").  Default
                             without a GPU: WHEEL_CUDA_ARCHS (sm_80 to sm_120) the nvcc knows.
  RHO_KERNELS_CPU_ARCH       -march for the CPU sources other than the per-ISA scoring kernels
                             (default: the compiler's, i.e. a portable build).  The scoring
                             kernel is always built per instruction set (see cpu_isa_variants).
  MAX_JOBS                   parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import subprocess
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


# The GPUs people own, Ampere to Blackwell (A100, RTX 30xx/A10, RTX 40xx/L4, H100, B200, RTX 50xx):
# the default architectures of a build without a GPU (wheels), those the installed nvcc knows;
# PTX of the newest for later GPUs.  CI builds 8.0;9.0 only (Makefile CUDA_ARCHS), for time.
WHEEL_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def default_cuda_archs(cuda_home: str) -> str:
    try:
        listed = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    known = {f"{int(m) // 10}.{int(m) % 10}" for m in re.findall(r"compute_(\d+)", listed)}
    archs = [a for a in WHEEL_CUDA_ARCHS if a in known] or ["8.0", "9.0"]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


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
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_archs(CUDA_HOME)

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
    ext.isa_sources = [(f"csrc/cpu/isa/score_cpu_{name}.cpp", flags) for name, flags in isas]
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


# ------------------------------------------------------------------------------------------------
# Packaging: the version (one place: rho_kernels/_version.py), the package metadata, and the build
# record rho_kernels/_C_build.json, written beside the compiled _C.  rho_kernels.backends._extension
# reads the record before loading _C and refuses an extension compiled against another torch.
# ------------------------------------------------------------------------------------------------
BUILD_RECORD_NAME = "_C_build.json"


def read_version() -> str:
    # Parsed, not imported: importing the package needs torch and the extension.
    with open(os.path.join(ROOT, "rho_kernels", "_version.py")) as f:
        match = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    if not match:
        raise RuntimeError("rho_kernels/_version.py has no __version__ = \"...\" line")
    return match.group(1)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_isa(cxx_flags: list[str]) -> str:
    """The at::vec width select_cpu.cpp compiles to under these flags: its own rule (AVX-512
    needs F/BW/VL/DQ; AVX2 needs AVX2/FMA/F16C), applied to the compiler's predefined macros."""
    arch = [f for f in cxx_flags if f.startswith(("-march=", "-mcpu=", "-mavx", "-mno-"))]
    macros = set(re.findall(r"#define (__\w+__) ", _run([os.environ.get("CXX", "c++"), *arch, "-dM", "-E", "-x", "c++", os.devnull])))
    if not macros:
        return "unknown"
    if {"__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__"} <= macros:
        return "AVX512"
    if {"__AVX2__", "__FMA__", "__F16C__"} <= macros:
        return "AVX2"
    return "DEFAULT"


def cuda_archs() -> list[str]:
    """The -gencode targets the CUDA build compiled (sm_XX = binary, compute_XX = PTX)."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags  # what BuildExtension passes to nvcc

        flags = _get_cuda_arch_flags()
    except Exception:  # a private helper: fall back to the requested list
        return [a for a in re.split(r"[;\s,]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "")) if a]
    # "-gencode=arch=compute_90,code=sm_90" -> "sm_90"; "...code=compute_90" (PTX) -> "compute_90"
    return sorted({m for f in flags for m in re.findall(r",code=(\w+)", f)})


def build_record(ext) -> dict:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    cxx = ext.extra_compile_args.get("cxx", []) if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
    with_cuda = any(src.endswith(".cu") for src in ext.sources)
    nvcc = _run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"]) if with_cuda and CUDA_HOME else ""
    march = [f.split("=", 1)[1] for f in cxx if f.startswith("-march=")]
    return {
        "rho_kernels": read_version(),
        "torch": str(torch.__version__),
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "compiler": (_run([os.environ.get("CXX", "c++"), "--version"]).splitlines() or ["unknown"])[0],
        "cpu_march": march[-1] if march else None,
        "cpu_isa": cpu_isa(cxx),  # the op layer's width; the scoring kernel is per ISA:
        "cpu_kernel_isas": [name for name, _ in cpu_isa_variants()],
        "with_cuda": with_cuda,
        "cuda_toolkit": (re.findall(r"release ([\d.]+)", nvcc) or [None])[0],
        "cuda_archs": cuda_archs() if with_cuda else [],
    }


def with_build_record(build_ext_cls):
    class BuildExtWithRecord(build_ext_cls):
        """build_ext that writes the build record beside the compiled _C (build dir and, for
        in-place and editable builds, the source tree)."""

        def run(self):
            super().run()
            inplace = self.inplace
            for ext in self.extensions:
                if ext.name != "rho_kernels._C":
                    continue
                record = json.dumps(build_record(ext), indent=2, sort_keys=True) + "\n"
                targets = set()
                for where in {False, inplace}:  # get_ext_fullpath answers for the current mode
                    self.inplace = where
                    targets.add(os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_RECORD_NAME))
                self.inplace = inplace
                for path in sorted(targets):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write(record)
                    print(f"rho_kernels: wrote the build record {path}")

    return BuildExtWithRecord


def long_description() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = extension_modules()
if "build_ext" in cmdclass:
    cmdclass["build_ext"] = with_build_record(cmdclass["build_ext"])

setup(
    name="rho_kernels",
    version=read_version(),
    description="Fused score + top-k kernels for online batch selection (RHO-LOSS, Rho-1)",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    license_expression="MIT",
    license_files=["LICENSE"],
    project_urls={
        "RHO-LOSS paper": "https://arxiv.org/abs/2206.07137",
        "Rho-1 paper": "https://arxiv.org/abs/2404.07965",
    },
    keywords=["pytorch", "cuda", "triton", "data selection", "rho-loss", "rho-1", "top-k", "kernels"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["rho_kernels", "rho_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # The wheel is tagged cp310-abi3 (below): one binary for every CPython >= 3.10.
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["tqdm", "safetensors"],
        # the drop-in trainers of rho_kernels.integrations (CI tests the pins of requirements.txt:
        # transformers 5.17.0, accelerate 1.15.0, lightning 2.6.6); Trainer needs accelerate
        "transformers": ["transformers>=5.0", "accelerate"],
        "lightning": ["lightning>=2.2"],
        # heads partitioned by DeepSpeed ZeRO-3 (pass the head module to the linear ops); CI pins 0.19.8
        "deepspeed": ["deepspeed>=0.16"],
        "dev": ["pytest", "expecttest", "build", "ninja", "matplotlib", "safetensors", "tqdm"],
    },
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
