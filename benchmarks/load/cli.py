"""Placeholder until the harness lands; replaced by the load-harness work."""


def main() -> int:
    raise SystemExit("inventory-bench: not built yet")
