"""mtty's guest workload: the bootblock, which finds every mtty function on PCI and loops bytes through each port."""

from labs.probes.mtty import is_mtty
from labs.workloads import register
from labs.workloads.bootblock import Bootblock

register(is_mtty, Bootblock())
