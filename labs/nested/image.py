"""Build the nested lab's base image: Debian trixie + kernel 6.12 + mtty.ko (+ mtty_faults.ko, labs_warn.ko) + libvirtd.

The build runs in stages inside one cache directory (see recipe.image_dir):
debootstrap, packages (apt in a chroot), mtty (kbuild against the image's own
kernel headers), configure, outer (the image's QEMU copied out beside it to run
the hosts, labs.nested.outer), then pack (ext4 via `mkfs.ext4 -d`, no loop mount,
converted to qcow2). Each stage leaves a marker, so an interrupted build picks
up where it stopped; `manifest.json` is written last and marks a usable image.
Everything comes from the Debian mirror through debootstrap and apt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

from labs.errors import InfraError
from labs.nested.outer import COPY_SCRIPT, OUTER_DIR, STAGED
from labs.nested.recipe import GUEST_DIR, Recipe, image_dir


class Reporter(Protocol):
    """Where a long build reports progress (lab.py draws it with rich)."""

    def stage(self, name: str, total: float | None = None) -> None: ...

    def update(self, completed: float | None = None, note: str | None = None) -> None: ...


class NullReporter:
    def stage(self, name: str, total: float | None = None) -> None:
        pass

    def update(self, completed: float | None = None, note: str | None = None) -> None:
        pass


@dataclass(frozen=True)
class BaseImage:
    dir: Path
    disk: Path
    kernel: Path
    initrd: Path
    manifest: dict[str, object]

    @property
    def kernel_version(self) -> str:
        return str(self.manifest["kernel_version"])


MANIFEST = "manifest.json"
GUEST_SOURCES_DIR = "/usr/local/share/labs-guest"  # in the image: labs/nested/guest, run by the build
STAGES = ("debootstrap", "packages", "mtty", "configure", "outer", "pack")

# Runs first at boot: takes this host's identity (hostname, SSH keys, addresses)
# from the read-only seed disk that vm.py makes at `up` time, so one base image
# serves every host and the base never holds a private key.
SEED_SCRIPT = r"""#!/bin/sh
# labs nested lab: apply this host's identity from the seed disk (LABEL=labsseed).
set -u
S=/run/labs-seed
mkdir -p "$S"
# vm.py attaches the seed as the second virtio disk; the kernel makes /dev/vdb
# as soon as virtio_blk probes, long before udev would publish the by-label link.
i=0
until [ -b /dev/vdb ] || [ $i -ge 50 ]; do sleep 0.2; i=$((i+1)); done
if mount -o ro /dev/vdb "$S"; then
    hostname "$(cat $S/hostname)"
    cp "$S/hostname" /etc/hostname
    cp "$S/hosts" /etc/hosts
    rm -f /etc/ssh/ssh_host_*
    install -m 600 "$S/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
    install -m 644 "$S/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
    install -d -m 700 /root/.ssh
    install -m 600 "$S/authorized_keys" /root/.ssh/authorized_keys
    install -m 600 "$S/id_ed25519" /root/.ssh/id_ed25519
    install -m 644 "$S/id_ed25519.pub" /root/.ssh/id_ed25519.pub
    install -m 644 "$S/known_hosts" /root/.ssh/known_hosts
    . "$S/net.env"
    umount "$S"
else
    echo "labs-seed: no seed disk; generating throwaway host keys" >&2
    ssh-keygen -A
fi
ip link set lo up
# udev loads virtio_net from the root fs, possibly after this unit starts: wait for both NICs.
i=0
until grep -qs "${MGMT_MAC:-none}" /sys/class/net/*/address && grep -qs "${LINK_MAC:-none}" /sys/class/net/*/address \
    || [ $i -ge 150 ]; do sleep 0.2; i=$((i+1)); done
# Interfaces are matched by MAC: names depend on PCI slots, MACs are ours.
for dev in /sys/class/net/*; do
    name=${dev##*/}
    mac=$(cat "$dev/address")
    if [ "$mac" = "${MGMT_MAC:-}" ]; then
        ip link set "$name" up
        ip addr add 10.0.2.15/24 dev "$name"
        ip route add default via 10.0.2.2 dev "$name"
    elif [ "$mac" = "${LINK_MAC:-}" ]; then
        ip link set "$name" up
        ip addr add "$LINK_CIDR" dev "$name"
    fi
done
exit 0
"""

SEED_UNIT = """[Unit]
Description=labs nested lab: host identity from the seed disk
After=systemd-udevd.service local-fs.target
Before=ssh.service libvirtd.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/labs-seed
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
"""

# Timers and services that only cost boot time (or CPU) under TCG.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "systemd-timesyncd.service",
    "getty@tty1.service",
)


def find_image(recipe: Recipe) -> BaseImage | None:
    """The cached image for this recipe, if a complete one exists."""
    d = image_dir(recipe)
    manifest = d / MANIFEST
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    img = BaseImage(d, d / "base.qcow2", d / "vmlinuz", d / "initrd.img", data)
    if not (img.disk.is_file() and img.kernel.is_file() and img.initrd.is_file()):
        return None
    return img


def ensure_image(recipe: Recipe, reporter: Reporter | None = None) -> BaseImage:
    """Return the cached base image, building it first when the recipe changed."""
    found = find_image(recipe)
    if found:
        return found
    if os.geteuid() != 0:
        raise InfraError("building the nested lab image needs root (debootstrap and chroot)")
    for tool in ("debootstrap", "qemu-img", "mkfs.ext4", "chroot"):
        if not shutil.which(tool):
            raise InfraError(f"{tool} not found: install the nested lab's host packages (labs.nested.HOST_PACKAGES)")
    d = image_dir(recipe)
    d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d) + ".lock"):
        found = find_image(recipe)
        if found:
            return found
        return Builder(recipe, d, reporter or NullReporter()).build()


def mounts_under(root: Path) -> list[Path]:
    """What is mounted at or below `root`, deepest first (a killed build leaves the chroot's mounts)."""
    top = os.path.realpath(root)
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    # /proc/mounts escapes spaces and the like as octal
    points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), ln.split()[1]) for ln in lines if ln.split()]
    found = {Path(p) for p in points if p == top or p.startswith(top + "/")}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(root: Path, ignore_errors: bool = False) -> None:
    """rmtree that first unmounts what a killed build left mounted inside: never recurse into a bind of /dev."""
    for point in mounts_under(root):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
    left = mounts_under(root)
    if left:
        raise InfraError(f"{root}: still has mounts inside ({', '.join(map(str, left))}); not removed")
    shutil.rmtree(root, ignore_errors=ignore_errors)


def prune_images(keep: Recipe) -> list[Path]:
    """Delete cached images of other recipes (about 1 GB each), except one being built or open in any process
    (another lab's QEMU holds its base image open)."""
    current = image_dir(keep)
    removed = []
    for d in sorted(current.parent.iterdir()):
        # image dirs are named by a recipe digest; "run" and other files stay
        if d.is_dir() and d != current and re.fullmatch(r"[0-9a-f]{16}", d.name) and not _in_use(d):
            remove_tree(d, ignore_errors=True)
            Path(str(d) + ".lock").unlink(missing_ok=True)
            removed.append(d)
    return removed


def _in_use(d: Path) -> bool:
    lock = FileLock(str(d) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True  # a build holds it
    lock.release()
    inside = f"{d}/"
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd).startswith(inside):
                return True
        except OSError:
            continue  # gone, or not ours to read
    return False


class Builder:
    def __init__(self, recipe: Recipe, out: Path, reporter: Reporter) -> None:
        self.recipe = recipe
        self.out = out
        self.work = out / "build"
        self.root = self.work / "rootfs"
        self.log = out / "build.log"
        self.reporter = reporter
        self.timings: dict[str, float] = {}

    # -- running commands ----------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        on_line: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Run a build command, appending its output to build.log; raise with the log's tail on failure."""
        full_env = {**os.environ, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **(env or {})}
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True, errors="replace"
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if on_line:
                    on_line(line.rstrip("\n"))
            rc = proc.wait()
        if rc != 0:
            tail = self.log.read_text(errors="replace").splitlines()[-25:]
            raise InfraError(f"{argv[0]} failed (exit {rc}); see {self.log}:\n" + "\n".join(tail))

    def chroot(self, *argv: str, on_line: Callable[[str], None] | None = None) -> None:
        self.run(["chroot", str(self.root), *argv], on_line=on_line)

    @contextmanager
    def mounted(self) -> Iterator[None]:
        """proc/sys/dev inside the chroot, for apt's maintainer scripts and kbuild; always unmounted."""
        mounts = [
            (["mount", "-t", "proc", "proc"], "proc"),
            (["mount", "-t", "sysfs", "sys"], "sys"),
            (["mount", "--bind", "/dev"], "dev"),
            (["mount", "--bind", "/dev/pts"], "dev/pts"),
        ]
        done: list[Path] = []
        try:
            for cmd, rel in mounts:
                target = self.root / rel
                target.mkdir(parents=True, exist_ok=True)
                subprocess.run([*cmd, str(target)], check=True, capture_output=True)
                done.append(target)
            yield
        finally:
            for target in reversed(done):
                subprocess.run(["umount", "-l", str(target)], capture_output=True)

    # -- stages ---------------------------------------------------------------

    def build(self) -> BaseImage:
        self.work.mkdir(parents=True, exist_ok=True)
        stage_fns: dict[str, Callable[[], None]] = {
            "debootstrap": self.debootstrap,
            "packages": self.packages,
            "mtty": self.mtty,
            "configure": self.configure,
            "outer": self.outer,
            "pack": self.pack,
        }
        for name in STAGES:
            marker = self.work / f"{name}.done"
            if marker.exists():
                self.timings[name] = float(marker.read_text() or 0)
                continue
            start = time.monotonic()
            stage_fns[name]()
            self.timings[name] = round(time.monotonic() - start, 1)
            marker.write_text(str(self.timings[name]))
        return self.finish()

    def debootstrap(self) -> None:
        # A half-done debootstrap cannot be resumed: start it clean.
        if self.root.exists():
            remove_tree(self.root)
        self.reporter.stage("debootstrap trixie", total=300)
        count = 0

        def tick(line: str) -> None:
            nonlocal count
            if line.startswith("I: "):
                count += 1
                self.reporter.update(completed=min(count, 299), note=line[3:60])

        r = self.recipe
        self.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--arch={r.arch}",
                "--include=ca-certificates",
                r.suite,
                str(self.root),
                r.mirror,
            ],
            on_line=tick,
        )
        self.reporter.update(completed=300)

    def packages(self) -> None:
        r = self.recipe
        (self.root / "etc/apt/sources.list").write_text(f"deb {r.mirror} {r.suite} main\n")
        # No service may start inside the chroot (libvirtd, sshd would run on the build host).
        policy = self.root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        self.reporter.stage("apt: kernel, headers, libvirt, qemu", total=100)
        status = re.compile(r"^(dlstatus|pmstatus):[^:]*:([0-9.]+):(.*)$")

        def tick(line: str) -> None:
            m = status.match(line)
            if m:
                # download is the first half, install the second
                pct = float(m.group(2)) / 2 + (50 if m.group(1) == "pmstatus" else 0)
                self.reporter.update(completed=pct, note=m.group(3)[:60])

        # one sync when apt is done (before the stage's marker) instead of dpkg's fsync after every file
        unsafe_io = self.root / "etc/dpkg/dpkg.cfg.d/labs-build-unsafe-io"
        unsafe_io.write_text("force-unsafe-io\n")
        with self.mounted():
            self.chroot("apt-get", "update", "-q")
            self.chroot(
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-o",
                "APT::Status-Fd=1",
                *r.packages,
                on_line=tick,
            )
            self.chroot("apt-get", "clean")
        unsafe_io.unlink()
        os.sync()

    def kernel_version(self) -> str:
        versions = sorted(
            p.name for p in (self.root / "lib/modules").iterdir() if p.name.startswith(self.recipe.kernel_series)
        )
        if not versions:
            raise InfraError(f"no {self.recipe.kernel_series} kernel in the image: {self.root / 'lib/modules'}")
        return versions[-1]

    def mtty(self) -> None:
        kver = self.kernel_version()
        self.reporter.stage(f"build mtty.ko for {kver}", total=None)
        tarballs = sorted((self.root / "usr/src").glob(f"linux-source-{self.recipe.kernel_series}.tar.*"))
        if not tarballs:
            raise InfraError("linux-source tarball missing from the image's /usr/src")
        src = self.root / "usr/src/mtty"
        if src.exists():
            shutil.rmtree(src)
        src.mkdir(parents=True)
        self.reporter.update(note="extracting samples/vfio-mdev/mtty.c")
        self.run(
            [
                "tar",
                "-xf",
                str(tarballs[-1]),
                "-C",
                str(src),
                "--strip-components=3",
                "--wildcards",
                f"*/{self.recipe.mtty_source}",
            ]
        )
        (src / "labs_warn.c").write_text(self.recipe.warn_module_source)
        shutil.copy(src / "mtty.c", src / "mtty_faults.c")
        (src / "mtty_faults.patch").write_text(self.recipe.mtty_faults_patch)
        (src / "Makefile").write_text("obj-m := mtty.o labs_warn.o mtty_faults.o\n")
        self.reporter.update(note="kbuild")
        with self.mounted():
            self.chroot("patch", "-p1", "-d", "/usr/src/mtty", "-i", "/usr/src/mtty/mtty_faults.patch")
            self.chroot("make", "-C", f"/lib/modules/{kver}/build", "M=/usr/src/mtty", "modules")
            dest = self.root / f"lib/modules/{kver}/updates"
            dest.mkdir(parents=True, exist_ok=True)
            for module in ("mtty.ko", "labs_warn.ko", "mtty_faults.ko"):
                shutil.copy(src / module, dest / module)
            self.chroot("depmod", "-a", kver)
        # The 150 MB source tarball has served its purpose; the extracted mtty.c stays as a record.
        tarballs[-1].unlink()

    def configure(self) -> None:
        r = self.recipe
        root = self.root
        self.reporter.stage("configure image", total=None)
        (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/ssh/sshd_config.d/labs.conf").write_text("\n".join(r.sshd_config) + "\n")
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()  # the base image holds no private key; each host gets its own from the seed
        (root / "etc/modules-load.d/labs.conf").write_text("\n".join(r.boot_modules) + "\n")
        # `install ... /bin/true` stops an explicit modprobe too, which `blacklist` lets through
        never = "".join(f"install {m} /bin/true\n" for m in r.never_modules)
        (root / "etc/modprobe.d/labs-never.conf").write_text(never)
        (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 0\n")
        (root / "etc/hostname").write_text("nested\n")
        (root / "etc/resolv.conf").write_text("")
        script = root / "usr/local/sbin/labs-seed"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(SEED_SCRIPT)
        script.chmod(0o755)
        (root / "etc/systemd/system/labs-seed.service").write_text(SEED_UNIT)
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / "labs-seed.service"
        if not link.is_symlink():
            link.symlink_to("/etc/systemd/system/labs-seed.service")
        for unit in MASKED_UNITS:
            masked = root / "etc/systemd/system" / unit
            if masked.is_symlink() or masked.exists():
                masked.unlink()
            masked.symlink_to("/dev/null")
        # libvirt's default NAT network needs dnsmasq and firewall tools we leave out.
        for net in (root / "etc/libvirt/qemu/networks/autostart").glob("*.xml"):
            net.unlink()
        # The lab runs QEMU as root: mdev/vfio device nodes then need no relabelling or chown.
        qemu_conf = root / "etc/libvirt/qemu.conf"
        if qemu_conf.exists():
            text = qemu_conf.read_text()
            if "# labs nested lab" not in text:
                qemu_conf.write_text(text + '\n# labs nested lab\nuser = "root"\ngroup = "root"\n')
        (root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        kver = self.kernel_version()
        # MODULES=most makes a 37 MB initrd that TCG unpacks slowly; the root disk needs only these.
        conf = root / "etc/initramfs-tools/initramfs.conf"
        conf.write_text(re.sub(r"(?m)^MODULES=.*$", "MODULES=list", conf.read_text()))
        (root / "etc/initramfs-tools/modules").write_text("\n".join(self.recipe.initrd_modules) + "\n")
        src = root / GUEST_SOURCES_DIR.lstrip("/")
        src.mkdir(parents=True, exist_ok=True)
        for name, text in r.guest_sources:
            (src / name).write_text(text)
            (src / name).chmod(0o755)
        with self.mounted():
            self.chroot("update-initramfs", "-u", "-k", kver)
            self.chroot("sh", f"{GUEST_SOURCES_DIR}/build-guest", GUEST_DIR)
        shutil.copy(root / f"boot/vmlinuz-{kver}", self.out / "vmlinuz")
        shutil.copy(root / f"boot/initrd.img-{kver}", self.out / "initrd.img")
        (self.work / "kernel_version").write_text(kver)

    def outer(self) -> None:
        self.reporter.stage("copy out the outer QEMU", total=None)
        self.chroot("sh", "-c", COPY_SCRIPT)
        dest = self.out / OUTER_DIR
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(self.root / STAGED, dest)

    def pack(self) -> None:
        size = f"{self.recipe.image_size_gb}G"
        raw = self.work / "root.ext4"
        raw.unlink(missing_ok=True)
        self.reporter.stage("pack ext4 -> qcow2", total=None)
        self.run(["mkfs.ext4", "-q", "-F", "-L", "labsroot", "-d", str(self.root), str(raw), size])
        disk = self.out / "base.qcow2"
        self.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)])
        raw.unlink()

    def finish(self) -> BaseImage:
        kver = (self.work / "kernel_version").read_text().strip()
        disk = self.out / "base.qcow2"
        manifest: dict[str, object] = {
            "recipe": self.recipe.as_dict(),
            "digest": self.recipe.digest(),
            "kernel_version": kver,
            "stage_seconds": self.timings,
            "build_seconds": round(sum(self.timings.values()), 1),
            "disk_bytes": disk.stat().st_size,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # The rootfs tree is only a build intermediate; the qcow2 is the image.
        if not os.environ.get("LABS_NESTED_KEEP_ROOTFS"):
            remove_tree(self.root, ignore_errors=True)
        (self.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return BaseImage(self.out, disk, self.out / "vmlinuz", self.out / "initrd.img", manifest)


def main() -> int:
    """Build (or find) the current recipe's image, say how long it took (`lab test` runs it early)."""
    from labs.nested.recipe import Recipe

    start = time.monotonic()
    try:
        image = ensure_image(Recipe())
    except (InfraError, OSError) as exc:
        print(f"nested image: not built: {exc}", flush=True)
        return 2
    print(f"nested image: {image.dir} ready after {time.monotonic() - start:.0f}s", flush=True)
    return 0
