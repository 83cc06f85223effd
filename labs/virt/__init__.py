"""Hypervisor layer (libvirt-python)."""
