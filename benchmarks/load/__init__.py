"""Load-test harness: `inventory-bench`."""
