"""Order routing solver."""
