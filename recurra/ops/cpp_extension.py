"""Building recurra's C++ kernels on first use (``torch.utils.cpp_extension``).

Each ``CompiledExtension`` is built from source files under ``csrc/``, compiled the first time it is
needed (a C++ compiler and ninja; about a minute, once per machine: the build is cached under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). ``available()`` says whether
it can serve and ``unavailable_reason()`` why not; ``load()`` raises with that reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
# -ffast-math lets GCC vectorise exp/tanh/log1p through glibc's vector math library; it is not
# passed to the linker, so the process's floating-point mode (denormals) is left alone.
BASE_CFLAGS = ["-O3", "-march=native", "-ffast-math"]


def headers_digest() -> str:
    """A short digest of the shared headers in csrc/."""
    digest = hashlib.sha1()
    for header in sorted(CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


class CompiledExtension:
    """One C++ extension: ``name`` (the module and cache name), ``sources`` (files in csrc/),
    ``openmp`` (compile with OpenMP so that ``at::parallel_for`` runs on torch's threads; torch's
    own libgomp serves it) and ``what`` (words for messages)."""

    def __init__(self, name: str, sources: tuple[str, ...], what: str, openmp: bool = False):
        self.name, self.what, self.openmp = name, what, openmp
        self.sources = [CSRC / source for source in sources]
        self.module = None
        self.error: str | None = None

    def load(self):
        """The compiled module, built on first use; RuntimeError with the reason if it cannot be
        built here."""
        if self.module is not None:
            return self.module
        if self.error is not None:
            raise RuntimeError(self.error)
        try:
            from torch.utils.cpp_extension import load as build

            # ninja installed by pip into this interpreter's environment, even when it is not on
            # PATH (a venv's python run without activating the venv)
            env_bin = str(Path(sys.executable).parent)
            if shutil.which("ninja") is None and shutil.which("ninja", path=env_bin):
                os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")
            cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser(
                "~/.cache/torch_extensions")
            if not any(p.name.startswith(self.name)
                       for p in Path(cache).rglob(f"{self.name}*.so")):
                print(f"recurra: compiling the C++ {self.what} (once per machine, ~1 min)",
                      file=sys.stderr, flush=True)
            cflags = BASE_CFLAGS + (["-fopenmp"] if self.openmp else ["-fopenmp-simd"])
            # torch rebuilds when a source or a flag changes: the headers' digest as a flag
            # makes a header change rebuild too
            cflags.append(f"-DRECURRA_HEADERS={headers_digest()}")
            self.module = build(name=self.name, sources=[str(p) for p in self.sources],
                                extra_cflags=cflags, extra_include_paths=[str(CSRC)],
                                extra_ldflags=["-fopenmp"] if self.openmp else [],
                                verbose=False)
        except Exception as exc:  # compiler, ninja or headers missing
            lines = str(exc).strip().splitlines() or [repr(exc)]
            first_error = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
            self.error = (f"the C++ {self.what} could not be built ({type(exc).__name__}: "
                          f"{first_error.strip()}); they need a C++ compiler and ninja "
                          f"(pip install ninja)")
            raise RuntimeError(self.error) from exc
        return self.module

    def available(self) -> bool:
        """Whether the extension can serve (builds it on first call)."""
        try:
            self.load()
        except RuntimeError:
            return False
        return True

    def unavailable_reason(self) -> str | None:
        """Why the extension cannot serve, or None if it can (builds it on first call)."""
        return None if self.available() else self.error
