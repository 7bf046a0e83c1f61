"""Application layer: composes domain rules and storage into the service's use cases."""
