"""The embedded sim lab: real sshd on loopback addresses, simulated devices."""

from labs.simlab.lab import SimLab

__all__ = ["SimLab"]
