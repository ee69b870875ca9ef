"""Build the native kernels at first use and load them with ctypes.

The library is compiled with the system C++ compiler into
$LLAMA_CACHE/native/<key>/libllama_native.so, where the key hashes the sources, the
compiler, the CPU (model and flags), the torch version and the flags. Several processes
(torchrun ranks) may start at once: one builds under a lock (llama.utils.locking) into a
temporary file and renames it into place; the others wait and load it. Without a compiler, or when the build
fails, `load()` returns None after a one-line notice and callers use PyTorch's kernels.
LLAMA_NATIVE=0 turns the library off.

The kernels use OpenMP and link the libgomp that torch ships, so they run on torch's own
intra-op thread team instead of a second pool competing for the same cores.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import settings
from ..utils.cpu import cpu_flags, cpu_model
from ..utils.locking import hold
from ..utils.measurements import first_use_work
from ..utils.ranks import is_main_rank, print0

ABI_VERSION = 5  # csrc/api.cpp
CSRC = Path(__file__).resolve().parent / "csrc"
LIB_NAME = "libllama_native.so"

_BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno"]
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
# object -> (source, its flags); the SIMD objects are only built for x86-64. decode.cpp is
# built twice: for any CPU, and for AVX-512 (its attention and elementwise loops vectorize).
_SOURCES = {name: (name, []) for name in ("api.cpp", "linear.cpp", "quant.cpp", "decode.cpp")}
_X86_SOURCES = {"linear_avx2.cpp": ("linear_avx2.cpp", _AVX2), "linear_avx512.cpp": ("linear_avx512.cpp", _AVX512),
                "linear_avx512_bf16.cpp": ("linear_avx512_bf16.cpp", _AVX512 + ["-mavx512bf16"]),
                "linear_amx.cpp": ("linear_amx.cpp", _AVX512 + ["-mavx512bf16"]),
                "attention_avx512_bf16.cpp": ("attention_avx512_bf16.cpp", _AVX512 + ["-mavx512bf16"]),
                "decode_avx512.cpp": ("decode.cpp", _AVX512 + ["-DLLAMA_DECODE_AVX512"]),
                "elementwise_avx512.cpp": ("elementwise_avx512.cpp", _AVX512)}
_AMX = ["-mamx-tile", "-mamx-bf16"]  # added to linear_amx.cpp where the compiler takes them

_state: dict = {}  # "lib": the loaded library or None, "reason": why not, "build_s": seconds


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _sources() -> dict:
    return {**_SOURCES, **(_X86_SOURCES if _x86() else {})}


def _source_files() -> List[str]:
    return sorted({source for source, _ in _sources().values()} | {p.name for p in CSRC.glob("*.h")})


def compiler() -> Optional[str]:
    """$CXX, else the first of c++, g++, clang++ on PATH."""
    for name in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _torch_gomp() -> Optional[Path]:
    """torch's own libgomp, which the library must share (None if torch ships none)."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return found[0] if found else None


def sources_digest() -> str:
    """A hash of the C++ sources: another version of the kernels gets its own build and tuning."""
    digest = hashlib.sha256()
    for name in _source_files():
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    digest.update(repr(sorted(_sources().items())).encode())
    return digest.hexdigest()


def build_key(cxx: str) -> str:
    digest = hashlib.sha256(sources_digest().encode())
    for part in [_compiler_version(cxx), cpu_model(), " ".join(cpu_flags()), torch.__version__,
                 " ".join(_BASE_FLAGS), str(_torch_gomp()), str(ABI_VERSION)]:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _compiler_takes(cxx: str, flags: List[str], out_dir: Path) -> bool:
    """Whether the compiler accepts these flags (an older one may lack e.g. AMX)."""
    probe = out_dir / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    try:
        done = subprocess.run([cxx, *flags, "-c", str(probe), "-o", str(out_dir / "probe.o")],
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _compile(cxx: str, out_dir: Path) -> Tuple[bool, str]:
    """Compile every source in parallel, then link. Returns (ok, compiler output)."""
    jobs: List[Tuple[subprocess.Popen, str]] = []
    objects = []
    amx = _x86() and _compiler_takes(cxx, _AMX, out_dir)
    for name, (source, flags) in _sources().items():
        if name == "linear_amx.cpp" and amx:
            flags = flags + _AMX  # else the file builds to a stub and the path is not offered
        obj = out_dir / (name + ".o")
        objects.append(str(obj))
        cmd = [cxx, *_BASE_FLAGS, *flags, "-c", str(CSRC / source), "-o", str(obj)]
        jobs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), " ".join(cmd)))
    log, ok = [], True
    for proc, cmd in jobs:
        out, _ = proc.communicate(timeout=600)
        log.append(f"$ {cmd}\n{out}")
        ok = ok and proc.returncode == 0
    if not ok:
        return False, "\n".join(log)
    gomp = _torch_gomp()
    # The portable objects come first: where SIMD and portable objects share an inline
    # function (the linker keeps one copy), the portable copy is the one kept.
    link = [cxx, "-shared", "-fopenmp", *objects, "-o", str(out_dir / LIB_NAME)]
    if gomp is not None:  # resolve OpenMP to the runtime torch has already loaded
        link += [str(gomp), f"-Wl,-rpath,{gomp.parent}"]
    done = subprocess.run(link, capture_output=True, text=True, timeout=600)
    log.append(f"$ {' '.join(link)}\n{done.stdout}{done.stderr}")
    return done.returncode == 0, "\n".join(log)


def build(cxx: str, target_dir: Path) -> Tuple[Optional[Path], str]:
    """The library in target_dir, built now unless it is there. Safe across processes.

    Returns (path or None, build log or the reason it failed)."""
    lib = target_dir / LIB_NAME
    failed = target_dir / "build-failed.log"
    target_dir.mkdir(parents=True, exist_ok=True)
    with first_use_work(), hold(lib, "the native CPU kernels (a C++ build of about a minute)",
                                quiet=not is_main_rank()):
        if lib.is_file():
            return lib, ""
        if failed.is_file():
            return None, f"the build failed before, see {failed} (delete it to try again)"
        start = time.perf_counter()
        # First use on this machine: say what the wait is (it is not repeated).
        print0(f"llama: building the native CPU kernels for this machine, once ({target_dir})...",
               file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=target_dir, prefix="tmp-") as tmp:
            ok, log = _compile(cxx, Path(tmp))
            if not ok:
                failed.write_text(log)
                return None, f"the build failed, see {failed}"
            os.replace(Path(tmp) / LIB_NAME, lib)  # atomic: nobody sees half a library
        _state["build_s"] = time.perf_counter() - start
        print0(f"llama: native CPU kernels built in {_state['build_s']:.0f} s", file=sys.stderr, flush=True)
        return lib, ""


def _notice(reason: str) -> None:
    print0(f"llama: native CPU kernels are off ({reason}); using PyTorch's kernels", file=sys.stderr)


def load() -> Optional[ctypes.CDLL]:
    """The native library, building it on first use; None when it is off or cannot be built."""
    if "lib" in _state:
        return _state["lib"]
    lib, reason = None, ""
    if settings.get("LLAMA_NATIVE") == "0":
        reason = "LLAMA_NATIVE=0"
    elif (cxx := compiler()) is None:
        reason = "no C++ compiler found; set CXX or install g++"
        _notice(reason)
    else:
        try:
            path, reason = build(cxx, settings.get("LLAMA_CACHE") / "native" / build_key(cxx))
            if path is not None:
                lib = ctypes.CDLL(str(path))
                if lib.llama_native_abi() != ABI_VERSION:
                    lib, reason = None, f"{path} is from another version; delete it"
        except Exception as e:  # a broken toolchain or cache must never stop the engine
            lib, reason = None, f"{type(e).__name__}: {e}"
        if lib is None:
            _notice(reason)
    _state["lib"], _state["reason"] = lib, reason
    return lib


def status() -> dict:
    """Whether the library is loaded, why not, and how long this process spent building it."""
    load()
    return {"loaded": _state["lib"] is not None, "reason": _state["reason"], "build_s": _state.get("build_s")}


def reset() -> None:
    """Forget the loaded library (tests switch LLAMA_NATIVE and LLAMA_CACHE)."""
    _state.clear()
