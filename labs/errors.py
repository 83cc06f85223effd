"""The error families a lab run distinguishes.

Reports sort failures by these classes: a driver defect is an assertion about a
rule or a readback; everything here is either bad input or lab infrastructure.
"""

from __future__ import annotations


class LabError(Exception):
    """Base of every error the framework raises on purpose."""


class ConfigError(LabError):
    """Bad input (an inventory, an option): shown as one line, never a traceback."""


class InfraError(LabError):
    """The lab itself failed (SSH, libvirt, a timeout), not the device under test."""


class SSHError(InfraError):
    """A host could not be reached or refused us."""


class CommandTimeout(InfraError):
    """A remote command ran past its timeout and was killed."""

    def __init__(self, host: str, command: str, timeout: float, stdout: str = "", stderr: str = "") -> None:
        super().__init__(f"{host}: command timed out after {timeout:g}s and was killed: {command}")
        self.host = host
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
