"""A Postgres-only inventory service built from our protos: the anchor `inventory-bench --peer`
measures our service against (issue 11).

It answers the InventoryService calls the harness's scenarios and set-up make (Reserve,
CommitReservation, ReleaseReservation of whole reservations, GetReservation, GetAvailability,
and UpsertLocations, ListLocations, SetStock, ImportStock) with the strongest design we know
that needs nothing but Postgres:

- a one-line Reserve is ONE statement: a conditional `UPDATE stock SET reserved = reserved + q
  WHERE ... AND on_hand - reserved - safety >= q`, with the reservation, its line and the
  idempotency answer inserted by data-modifying CTEs of the same statement (the answer's bytes
  are built before it: the id and the times are the peer's to choose);
- a multi-line Reserve is one statement too, all or nothing: its rows locked in (sku, location)
  order by a `SELECT ... FOR UPDATE` CTE that every write of the statement waits for;
- Commit and Release are one statement each (reservation locked, then its stock rows in order),
  one transaction with the idempotency answer when the call has a key (BEGIN, the statement,
  INSERT + COMMIT in one round trip);
- GetAvailability is one SELECT; a sweeper expires due reservations every second, as ours does.

Same durability as ours (it runs on the same Postgres: fsync and synchronous_commit on), same
idempotency semantics (same key and request: the first answer's bytes; another request:
ALREADY_EXISTS), and our tables: it runs our migrations on its own database, so the harness's
invariant check reads it unchanged. asyncpg, statements prepared once per connection, a plain
free list of connections, no ORM. `python -m benchmarks.peer --port P --database-url URL`.
"""
