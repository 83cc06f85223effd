"""The nested lab: two QEMU VMs running Debian trixie with the real mtty mdev, libvirtd and sshd."""
