"""Process-level set-up shared by the command lines (kept free of heavy imports)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

#: Debian/Ubuntu path of tcmalloc (package ``libtcmalloc-minimal4``).
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def reexec_with_tcmalloc(script: str, argv: list[str]) -> None:
    """Re-execute ``script argv`` with tcmalloc preloaded, when it is installed and not yet loaded.

    On small VMs glibc's allocator pays for fresh pages on every large tensor and makes CPU
    inference and training several times slower (measured in shared/notes/cpu-performance.md).
    Does nothing off Linux, without tcmalloc, with ``--no-tcmalloc`` in ``argv`` or with the
    environment variable ``IFI_SEG_NO_TCMALLOC=1``. Returns only when it does not re-execute.
    """
    if "--no-tcmalloc" in argv or os.environ.get("IFI_SEG_NO_TCMALLOC") == "1":
        return
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    if sys.platform.startswith("linux") and Path(TCMALLOC).exists():
        env = dict(os.environ)
        env["LD_PRELOAD"] = (TCMALLOC + " " + env.get("LD_PRELOAD", "")).strip()
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *argv], env)
