"""Build ``sparsemm_kernels._C``: C++ CPU ops always, CUDA ops when ``nvcc`` is found.

setuptools compiles the C++ sources (``csrc/**/*.cpp``); ``csrc/**/*.cu`` go through nvcc driven by a
generated ``build.ninja`` in the build temp dir; everything is linked into one pybind11 module with the CUDA
runtime linked statically, so ``_C`` imports on machines without libcudart and without any libtorch.

Environment:
    SPARSEMM_BUILD_CUDA   unset: CUDA ops if nvcc is found; 0: never; 1: required (error without nvcc).
                          SPARSEMM_SKIP_CUDA_BUILD=1 is accepted as a synonym for 0.
    SPARSEMM_CUDA_ARCHS   ";"- or ","-separated SM list, default "80;90a" ("90+PTX" also embeds PTX).
    CUDA_HOME/CUDA_PATH   where to look for nvcc first (then PATH, then /usr/local/cuda).
    MAX_JOBS              parallel compile jobs (C++ and ninja); default: all cores.
    NVCC_THREADS          nvcc --threads (architectures compiled in parallel per file); default 2.

The functions above ``setup()`` are imported by ``tests/test_nvcc_compile.py`` so the flags live in one place.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
INCLUDE_DIR = CSRC / "include"
DEFAULT_CUDA_ARCHS = "80+PTX;90a"  # sm_80 PTX: GPUs past these (Blackwell) JIT it rather than fail


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, then /usr/local/cuda/bin; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() else None


def cuda_lib_dir(nvcc: str) -> Path:
    """Directory holding libcudart_static.a for this nvcc's toolkit."""
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc), so try several homes, not just its parent.
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(nvcc).resolve().parent.parent]
    homes.append("/usr/local/cuda")
    subdirs = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    for home in homes:
        for sub in subdirs if home else ():
            if (Path(home) / sub / "libcudart_static.a").is_file():
                return Path(home) / sub
    raise RuntimeError(f"sparsemm_kernels: found nvcc at {nvcc} but no libcudart_static.a; set CUDA_HOME")


def cuda_archs(spec: str | None = None) -> list[str]:
    """Parse SPARSEMM_CUDA_ARCHS-style text ("80;90a", "8.0,9.0a", "90+PTX") into ["80", "90a", "90+PTX"]."""
    if spec is None:
        spec = os.environ.get("SPARSEMM_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"SPARSEMM_CUDA_ARCHS: cannot parse {item!r} (expected e.g. 80, 90a, 9.0, 90+PTX)")
        archs.append(f"{m[1]}{m[2]}{m[3].lower()}" + ("+PTX" if m[4] else ""))
    if not archs:
        raise ValueError(f"SPARSEMM_CUDA_ARCHS is empty: {spec!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """-gencode pairs: SASS for each arch, plus PTX for those marked +PTX."""
    flags = []
    for arch in archs:
        sm = arch.removesuffix("+PTX")
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
        if arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{sm},code=compute_{sm}"]
    return flags


def nvcc_flags(archs: list[str] | None = None) -> list[str]:
    """Every nvcc flag used for csrc/**/*.cu (the build and the compile test share this list)."""
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DSPARSEMM_WITH_CUDA", f"-I{INCLUDE_DIR}"]
    # Hidden like the pybind11-compiled C++: cub's template instances must not be exported, where another
    # extension's copies of the same (versioned) names could interpose them.
    flags += ["-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
    threads = os.environ.get("NVCC_THREADS", "2")
    if threads != "1":
        flags += ["--threads", threads]
    return flags + gencode_flags(archs if archs is not None else cuda_archs())


def cuda_sources() -> list[Path]:
    return sorted(CSRC.rglob("*.cu"))


def cpp_sources() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))


def want_cuda() -> str | None:
    """The nvcc to build CUDA ops with, or None for a CPU-only _C (and why, printed once)."""
    flag = os.environ.get("SPARSEMM_BUILD_CUDA", "")
    if os.environ.get("SPARSEMM_SKIP_CUDA_BUILD", "") == "1":
        flag = "0"
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"SPARSEMM_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        print("sparsemm_kernels: SPARSEMM_BUILD_CUDA=0, building _C without CUDA ops", file=sys.stderr)
        return None
    nvcc = find_nvcc()
    if nvcc is None and flag == "1":
        raise RuntimeError(
            "sparsemm_kernels: SPARSEMM_BUILD_CUDA=1 but nvcc was not found (checked CUDA_HOME, CUDA_PATH, "
            "PATH, /usr/local/cuda); install the CUDA toolkit or set CUDA_HOME"
        )
    if nvcc is None:
        print("sparsemm_kernels: nvcc not found, building _C without CUDA ops", file=sys.stderr)
    return nvcc


def max_jobs() -> int:
    return int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)


def _ninja() -> str:
    try:
        import ninja  # the pip package, listed in [build-system] requires

        path = Path(ninja.BIN_DIR) / "ninja"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if not found:
        raise RuntimeError("sparsemm_kernels: building the CUDA ops needs ninja (`pip install ninja`)")
    return found


def build_cuda_objects(nvcc: str, sources: list[Path], build_dir: Path) -> list[str]:
    """Compile .cu files to objects with nvcc through a generated build.ninja; returns the object paths.

    Ninja gives parallel and incremental (header-dependency aware, via nvcc -MD) builds for free.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = " ".join(_ninja_escape(f) for f in nvcc_flags())
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {_ninja_escape(nvcc)}",
        f"flags = {flags}",
        "rule nvcc",
        "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $out",
    ]
    objects = []
    for src in sources:
        obj = build_dir / (str(src.relative_to(CSRC)).replace(os.sep, "_") + ".o")
        objects.append(str(obj))
        lines.append(f"build {_ninja_escape(str(obj))}: nvcc {_ninja_escape(str(src))}")
    text = "\n".join(lines) + "\n"
    ninja_file = build_dir / "build.ninja"
    if not ninja_file.is_file() or ninja_file.read_text() != text:
        ninja_file.write_text(text)
    subprocess.run([_ninja(), "-C", str(build_dir), "-j", str(max_jobs())], check=True)
    return objects


def _ninja_escape(s: str) -> str:
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _has_openmp(compiler, tmp: Path) -> bool:
    """Whether the C++ compiler accepts -fopenmp (compile and link a one-liner)."""
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "omp_probe.cpp"
    src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    try:
        objs = compiler.compile([str(src)], output_dir=str(tmp), extra_postargs=["-fopenmp"])
        compiler.link_executable(objs, "omp_probe", output_dir=str(tmp), extra_postargs=["-fopenmp"])
        return True
    except Exception:
        return False


if __name__ == "__main__":
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    from setuptools import find_namespace_packages, setup
    from setuptools.command.build_ext import build_ext

    ParallelCompile("MAX_JOBS").install()

    class BuildExt(build_ext):
        """build_ext that adds OpenMP when available and the nvcc objects + static cudart when wanted."""

        def build_extension(self, ext):
            if ext.name == "sparsemm_kernels._C":
                self._configure(ext)
            super().build_extension(ext)

        def _configure(self, ext):
            with tempfile.TemporaryDirectory() as probe_dir:
                if _has_openmp(self.compiler, Path(probe_dir)):
                    ext.extra_compile_args.append("-fopenmp")
                    ext.extra_link_args.append("-fopenmp")
                else:
                    print("sparsemm_kernels: no OpenMP, the C++ ops run single-threaded", file=sys.stderr)
            nvcc = want_cuda()
            if nvcc is None:
                return
            print(f"sparsemm_kernels: building CUDA ops with {nvcc} for {cuda_archs()}", file=sys.stderr)
            nvcc_dir = Path(self.build_temp).resolve() / "nvcc"  # absolute: ninja runs from its own dir
            ext.extra_objects += build_cuda_objects(nvcc, cuda_sources(), nvcc_dir)
            ext.define_macros.append(("SPARSEMM_WITH_CUDA", "1"))
            ext.library_dirs.append(str(cuda_lib_dir(nvcc)))
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
            # Keep the static runtime's symbols private: otherwise the dynamic linker may bind our calls to
            # torch's libcudart (loaded RTLD_GLOBAL), which knows nothing of the kernels registered here.
            ext.extra_link_args.append("-Wl,--exclude-libs,ALL")
            # The objects are not listed as sources, so tell setuptools to relink when they change.
            ext.depends += ext.extra_objects

    setup(
        name="sparsemm_kernels",
        version="0.1.0",
        description="GPU kernels for sparse and modality-aware transformer layers",
        packages=find_namespace_packages(include=["sparsemm_kernels", "sparsemm_kernels.*"], exclude=["*.__pycache__"]),
        python_requires=">=3.10",
        install_requires=["torch>=2.4"],
        # The GPU kernels; the range `make aot` compiles and checks (utils/device.py: TRITON_SUPPORTED).
        extras_require={"triton": ["triton>=3.6,<3.10"]},
        ext_modules=[
            Pybind11Extension(
                "sparsemm_kernels._C",
                cpp_sources(),
                include_dirs=[str(INCLUDE_DIR)],
                depends=[str(p.relative_to(ROOT)) for p in sorted(INCLUDE_DIR.rglob("*.h"))],
                cxx_std=17,
                extra_compile_args=["-O3"],
            )
        ],
        cmdclass={"build_ext": BuildExt},
        zip_safe=False,
    )
