"""inventory.v1: generated at install time from protos/inventory/v1/."""
