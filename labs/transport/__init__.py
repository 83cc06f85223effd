"""SSH to lab hosts (paramiko)."""

from labs.transport.pool import SSHPool
from labs.transport.ssh import CommandFailed, ConnectionLost, HostConnection, HostKeyError, Result

__all__ = ["CommandFailed", "ConnectionLost", "HostConnection", "HostKeyError", "Result", "SSHPool"]
