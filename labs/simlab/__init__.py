"""The embedded sim lab: real sshd on loopback addresses, simulated devices."""

from labs.simlab.lifecycle import SimLab

__all__ = ["SimLab"]
