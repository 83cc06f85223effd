"""labs: hardware-in-the-loop test lab framework for VFIO device migration."""

__version__ = "0.1.0"
