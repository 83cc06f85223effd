"""Build the bootblock with the controller's own compiler, once per source version.

No binary is committed: the sources in labs/workloads/bootblock/ are compiled
at first use into a cache keyed by their digest and the compiler's version
(`./lab` installs gcc; binutils comes with it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from labs.errors import InfraError

SOURCE_DIR = Path(__file__).resolve().parent / "bootblock"
SOURCES = ("entry.S", "bootblock.c")
CFLAGS = (
    "-m32", "-march=i686", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-nostdlib", "-static", "-no-pie", "-Wall", "-Wextra", "-Werror",
)  # fmt: skip
LDFLAGS = ("-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments")


class ToolchainMissing(InfraError):
    """No C compiler that can build the bootblock on this controller."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "labs" / "bootblock"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise ToolchainMissing("no C compiler (gcc) to build the guest workload: install gcc (./lab does)")
    return cc


def build(out_dir: Path | None = None) -> Path:
    """The bootblock ELF, built now if this source version has not been built with this compiler."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256(version.encode())
    for name in (*SOURCES, "bootblock.ld"):
        digest.update((SOURCE_DIR / name).read_bytes())
    target = (out_dir or cache_dir()) / f"bootblock-{digest.hexdigest()[:16]}.elf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        scratch = Path(tmp) / target.name
        cmd = [cc, *CFLAGS, f"-Wl,-T,{SOURCE_DIR / 'bootblock.ld'}", *LDFLAGS, "-o", str(scratch)]
        cmd += [str(SOURCE_DIR / s) for s in SOURCES]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise ToolchainMissing(f"building the bootblock with {cc} failed: {res.stderr.strip()[-600:]}")
        os.replace(scratch, target)  # atomic: parallel workers build the same file
    return target
