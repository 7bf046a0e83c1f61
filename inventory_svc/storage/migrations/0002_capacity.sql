-- Daily shipment capacity consumed by routed reservations (DESIGN §5: one per used location).
CREATE TABLE capacity_usage (
    location_id text NOT NULL REFERENCES locations (id),
    day         date NOT NULL,
    used        integer NOT NULL CHECK (used >= 0),
    PRIMARY KEY (location_id, day)
);
