-- Every returned line, whatever became of the goods (issue 10 §2): what a sale has had back is one
-- query, so a return can never bring back more than the sale sold. Only SELLABLE lines touch
-- stock (with a RETURN movement); INSPECTION and WRITE_OFF lines live only here, so on_hand stays
-- the sum of the ledger (I3) and availability never counts goods nobody may sell.
CREATE TABLE returns (
    return_id       text NOT NULL,
    sku             text NOT NULL,
    -- the sale: a committed reservation (with its order_ref), an order_ref alone, or neither
    -- for an unmatched return (erp/admin only)
    reservation_id  text NOT NULL DEFAULT '',
    order_ref       text NOT NULL DEFAULT '',
    unmatched       boolean NOT NULL,
    location_id     text NOT NULL REFERENCES locations (id),
    quantity        bigint NOT NULL CHECK (quantity > 0),
    disposition     text NOT NULL CHECK (disposition IN ('SELLABLE', 'INSPECTION', 'WRITE_OFF')),
    principal       text NOT NULL DEFAULT '',
    idempotency_key text,  -- NULL: the call had none
    reason          text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (return_id, sku),
    CHECK (unmatched = (reservation_id = '' AND order_ref = ''))
);
CREATE INDEX returns_reservation ON returns (reservation_id, sku) WHERE reservation_id <> '';
CREATE INDEX returns_order_ref ON returns (order_ref, sku) WHERE order_ref <> '';
