"""Scenarios written once, used by the suites (and certification): save/resume, migration, faults, readback."""
