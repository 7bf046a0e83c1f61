"""Storage: Postgres (source of truth) and Redis (atomic gate + read model), behind small classes."""
