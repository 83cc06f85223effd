"""Inventory: YAML (native or Ansible shape) validated into a resolved Lab description."""

from labs.inventory.loader import load_inventory
from labs.inventory.resolved import Inventory, LabDevice, LabHost, LabPair
from labs.inventory.yamlsource import InventoryError

__all__ = ["Inventory", "InventoryError", "LabDevice", "LabHost", "LabPair", "load_inventory"]
