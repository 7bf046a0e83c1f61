"""Domain: frozen types, rules and validation. No I/O here."""
