"""Vendor certification: one device, every applicable rule and scenario, one signed-off file."""
