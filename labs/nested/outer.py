"""The outer QEMU, the one that runs the nested hosts: the image's own, copied out of it at build time.

The image installs trixie's QEMU for the hosts' libvirt anyway; the build copies that binary, the
libraries it links (its own loader among them) and its firmware beside the image, and the hosts run
under it through that loader, so the controller needs no newer QEMU package. Measured against the
controller's Debian 12 QEMU 7.2 (docs/nested-findings.md, "The outer QEMU"): under TCG a nested host
forks and execs five times as fast and boots ~15 % sooner; the suites gain little. Where an image has
no copy, its hosts run under the controller's `qemu-system-x86_64`.
"""

from __future__ import annotations

from pathlib import Path

OUTER_DIR = "outer"  # under the image's directory
BINARY = "qemu-system-x86_64"
LOADER = "ld-linux-x86-64.so.2"

# Run in the image's root (chroot) while the build has it: `cp -L` follows the image's own symlinks (merged
# /usr, the library versions), which a copy from outside would resolve against the controller's.
COPY_SCRIPT = r"""set -eu
d=/labs-outer
rm -rf "$d"
mkdir -p "$d/lib" "$d/share"
cp -L /usr/bin/qemu-system-x86_64 "$d/"
for lib in $(ldd /usr/bin/qemu-system-x86_64 | grep -o '/[^ ]*'); do cp -L "$lib" "$d/lib/"; done
for dir in /usr/share/qemu /usr/share/seabios; do
    for f in "$dir"/*; do [ -f "$f" ] && cp -L "$f" "$d/share/"; done
done
"""
STAGED = "labs-outer"  # where COPY_SCRIPT leaves it, under the image's root


def command(image_dir: Path) -> list[str]:
    """How to run the outer QEMU for the image in `image_dir`: its own copy where the build made one."""
    d = image_dir / OUTER_DIR
    if not (d / BINARY).is_file() or not (d / "lib" / LOADER).is_file():
        return [BINARY]
    return [str(d / "lib" / LOADER), "--library-path", str(d / "lib"), str(d / BINARY), "-L", str(d / "share")]
