"""Build stagetrace.low_level._C with ninja, picking the CUDA or the CPU-only build.

The extension links the CUDA runtime statically and never includes libtorch
headers, so one build works with any torch. The CUDA backend is compiled
wherever a CUDA toolkit is found (headers + libcudart_static.a), even on
machines without a GPU; otherwise a CPU-only build is made and says so.

Environment:
  CUDA_HOME / CUDA_PATH      where the toolkit lives (else nvcc on PATH, else /usr/local/cuda)
  STAGETRACE_FORCE_CPU=1     build without the CUDA backend even if a toolkit exists
  STAGETRACE_CUDA_ARCHS      SM targets of the GPU-side stamp kernels (default "80;86;89;90;100;120")
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def find_cuda_home() -> Path | None:
    if os.environ.get("STAGETRACE_FORCE_CPU", "") not in ("", "0"):
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if not c:
            continue
        home = Path(c)
        header = home / "include" / "cuda_runtime_api.h"
        static = next((home / d / "libcudart_static.a" for d in ("lib64", "lib", "targets/x86_64-linux/lib")
                       if (home / d / "libcudart_static.a").exists()), None)
        if header.exists() and static is not None:
            return home
    return None


def cuda_archs() -> list[str]:
    """-gencode targets: Ampere to Blackwell as SASS, plus Hopper PTX for newer cards.

    STAGETRACE_CUDA_ARCHS (e.g. "90" or "80;90") narrows it for faster builds."""
    wanted = os.environ.get("STAGETRACE_CUDA_ARCHS", "80;86;89;90;100;120").replace(",", ";").split(";")
    archs = [f"arch=compute_{a},code=sm_{a}" for a in wanted if a.strip()]
    ptx = max(int(a) for a in wanted if a.strip())
    return archs + [f"arch=compute_{ptx},code=compute_{ptx}"]


def cudart_static(home: Path) -> Path:
    for d in ("lib64", "lib", "targets/x86_64-linux/lib"):
        p = home / d / "libcudart_static.a"
        if p.exists():
            return p
    raise FileNotFoundError(home)


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for the one extension and runs ninja (incremental)."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / "ninja"
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)

        cuda = find_cuda_home()
        sources = ["host_timeline.cpp", "stage_rows.cpp", "call_leads.cpp", "bindings.cpp"]
        cflags = ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
                  f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
        ldflags = ["-shared", "-Wl,--exclude-libs,ALL"]
        libs: list[str] = []
        nvcc = cuda / "bin" / "nvcc" if cuda is not None else None
        cu_sources: list[str] = []
        nvflags: list[str] = []
        if cuda is not None:
            sources.append("cuda_timeline.cpp")
            cflags += ["-DSTAGETRACE_WITH_CUDA", f"-I{cuda / 'include'}"]
            if nvcc is not None and nvcc.exists():
                # GPU-side stamps (graph-capturable) need device code; without nvcc the
                # event timeline still builds and in-graph layer stamps are reported missing.
                cu_sources.append("stamp_ring.cu")
                cflags.append("-DSTAGETRACE_WITH_STAMPS")
                nvflags = ["-O2", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{CSRC}",
                           *[f for a in cuda_archs() for f in ("-gencode", a)]]
            else:
                print(f"stagetrace: no nvcc in {cuda / 'bin'}: building without GPU-side stamps")
            libs += [str(cudart_static(cuda)), "-lrt", "-ldl", "-lpthread"]
            print(f"stagetrace: building WITH the CUDA backend (toolkit at {cuda})")
        else:
            print("stagetrace: no CUDA toolkit found (or STAGETRACE_FORCE_CPU set): building the CPU-only "
                  "backend; set CUDA_HOME to a toolkit with libcudart_static.a for the CUDA backend")

        cxx = os.environ.get("CXX", "c++")
        q = lambda items: " ".join(shlex.quote(str(i)) for i in items)  # noqa: E731
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {q(cflags)}",
            f"ldflags = {q(ldflags)}",
            f"libs = {q(libs)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $out",
            f"nvcc = {shlex.quote(str(nvcc))}",
            f"nvflags = {q(nvflags)}",
            "rule nvcc",
            "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $out",
            "rule link",
            "  command = $cxx $ldflags $in -o $out $libs",
            "  description = LINK $out",
        ]
        objs = []
        for s in sources:
            obj = tmp / (Path(s).stem + ".o")
            objs.append(obj)
            lines.append(f"build {obj}: cxx {CSRC / s}")
        for s in cu_sources:
            obj = tmp / (Path(s).stem + ".cu.o")
            objs.append(obj)
            lines.append(f"build {obj}: nvcc {CSRC / s}")
        lines.append(f"build {out}: link {' '.join(map(str, objs))}")
        build_file = tmp / "build.ninja"
        text = "\n".join(lines) + "\n"
        # Rewrite only on change, so ninja's own up-to-date checks keep working.
        if not build_file.exists() or build_file.read_text() != text:
            build_file.write_text(text)
        ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
        subprocess.check_call([ninja, "-C", str(tmp)])


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import find_cuda_home
    setup(
        ext_modules=[Extension("stagetrace.low_level._C", sources=[])],
        cmdclass={"build_ext": NinjaBuildExt},
    )
