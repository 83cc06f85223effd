"""The nested lab's image recipe, as data, and its hash.

Everything that changes what ends up in the base image lives here, so that the
image cache key (a hash of this recipe) changes exactly when the image must be
rebuilt. Per-host identity (keys, addresses) is *not* part of the image: it is
injected at `up` time through a small seed disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Host-side tools the controller needs to build and run the nested lab (Debian
# package names); the bootstrap installs these.
HOST_PACKAGES: tuple[str, ...] = (
    "debootstrap",
    "qemu-system-x86",
    "qemu-utils",
    "e2fsprogs",
    "openssh-client",
    "xz-utils",
)

# Packages inside each nested host. --no-install-recommends keeps the image
# small; everything listed is needed for a reason noted beside it.
GUEST_PACKAGES: tuple[str, ...] = (
    "systemd-sysv",  # PID 1; libvirtd is a systemd service
    "udev",
    "kmod",
    "iproute2",
    "iputils-ping",  # the smoke test pings across the private link
    "openssh-server",
    "python3",  # the labs agent runs here
    "linux-image-amd64",
    "linux-headers-amd64",  # kbuild for mtty.ko
    "linux-source-6.12",  # samples/vfio-mdev/mtty.c
    "build-essential",
    "xz-utils",
    "initramfs-tools",
    "libvirt-daemon-system",
    "libvirt-clients",
    "libvirt-daemon-driver-qemu",
    "qemu-system-x86",
    "qemu-utils",
    "seabios",
    "ipxe-qemu",  # q35's default NIC ROMs
    "netcat-openbsd",  # libvirt's ssh transport falls back to nc on old clients
    "ca-certificates",
    "busybox-static",  # the Linux guest's initramfs (labs/nested/guest)
    "qemu-guest-agent",  # ... and its agent, copied in with the libraries it links
)

# A test module built beside mtty.ko and not loaded at boot: each write to its `warn` parameter makes
# the kernel log a WARNING (and taint W), so tests can show the lab's host kernel verdict on a real kernel.
LABS_WARN_C = r"""// SPDX-License-Identifier: GPL-2.0
#include <linux/bug.h>
#include <linux/module.h>
#include <linux/moduleparam.h>

static int labs_warn_set(const char *val, const struct kernel_param *kp)
{
	WARN(1, "labs_warn: deliberate warning\n");
	return 0;
}

static const struct kernel_param_ops labs_warn_ops = {
	.set = labs_warn_set,
};
module_param_cb(warn, &labs_warn_ops, NULL, 0200);
MODULE_PARM_DESC(warn, "any write logs a WARNING");
MODULE_DESCRIPTION("labs: a kernel WARNING on demand, for tests of the host kernel verdict");
MODULE_LICENSE("GPL");
"""

# mtty with fault knobs, a patch kept in the repo (labs/nested/mtty_faults.patch)
MTTY_FAULTS_PATCH = (Path(__file__).parent / "mtty_faults.patch").read_text()

# The Linux guest (inventory `lab.guest`): its init, workload and the script that builds its initramfs
# from the image's own busybox, qemu-ga and kernel, at image-build time; (name, content) so the digest sees them
GUEST_SOURCES: tuple[tuple[str, str], ...] = tuple(
    (p.name, p.read_text()) for p in sorted((Path(__file__).parent / "guest").iterdir()) if p.is_file()
)
GUEST_DIR = "/var/lib/labs/guest"  # in each nested host: vmlinuz and initrd.img

# Modules loaded at boot, in dependency order (modprobe resolves the rest).
BOOT_MODULES: tuple[str, ...] = ("vfio", "vfio_iommu_type1", "mdev", "vfio_pci", "mtty", "mtty_faults")
# Modules that never load: KVM on TCG's emulated SVM is unstable, and a libvirt that saw /dev/kvm at boot
# may go on offering kvm domains after setup unloads it (docs/incidents.md).
NEVER_MODULES: tuple[str, ...] = ("kvm_amd", "kvm_intel", "kvm")


def default_mirror() -> str:
    """The Debian mirror this machine already uses; LABS_NESTED_MIRROR overrides it."""
    env = os.environ.get("LABS_NESTED_MIRROR")
    if env:
        return env.rstrip("/")
    pattern = re.compile(r"(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s*)?)(https?://\S+/debian)/?(?:\s|$)")
    for path in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if line.lstrip().startswith("#"):
                continue
            m = pattern.search(line)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Recipe:
    suite: str = "trixie"
    arch: str = "amd64"
    kernel_series: str = "6.12"
    packages: tuple[str, ...] = GUEST_PACKAGES
    boot_modules: tuple[str, ...] = BOOT_MODULES
    never_modules: tuple[str, ...] = NEVER_MODULES
    # the initrd only has to find and mount the root disk (virtio-blk, ext4); virtio_net rides
    # along so the NICs exist before labs-seed configures them
    initrd_modules: tuple[str, ...] = ("virtio_pci", "virtio_blk", "virtio_net", "ext4", "crc32c_generic")
    mtty_source: str = "samples/vfio-mdev/mtty.c"
    warn_module_source: str = LABS_WARN_C
    mtty_faults_patch: str = MTTY_FAULTS_PATCH
    guest_sources: tuple[tuple[str, str], ...] = GUEST_SOURCES
    image_size_gb: int = 6
    sshd_config: tuple[str, ...] = (
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UseDNS no",
        # libvirt's qemu+ssh and the agent each hold a channel open for a long time
        "MaxSessions 64",
        "ClientAliveInterval 30",
    )
    # Bumped by hand when image.py changes how it assembles the image.
    builder_version: int = 4
    mirror: str = field(default_factory=default_mirror)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def digest(self) -> str:
        """A short, stable hash of everything that shapes the image.

        The mirror is left out: it says where packages come from, not what they
        are, and CI and a developer may reach the same archive by different URLs.
        """
        doc_dict = self.as_dict()
        doc_dict.pop("mirror")
        doc = json.dumps(doc_dict, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "labs" / "nested"


def image_dir(recipe: Recipe) -> Path:
    return cache_root() / recipe.digest()
