-- Reservations belong to the principal that made them (DESIGN §8), and hold the day's shipment
-- capacity they took (DESIGN §5).

-- The principal's name; '' for calls made with no keys configured (the anonymous principal).
-- A reservation of another owner is NOT_FOUND to a principal that does not manage all of them.
ALTER TABLE reservations ADD COLUMN owner text NOT NULL DEFAULT '';
-- ExtendReservation calls so far (the max_extensions quota).
ALTER TABLE reservations ADD COLUMN extensions integer NOT NULL DEFAULT 0;

-- Capacity follows the reservation. A RouteAndReserve takes one shipment of the day's capacity
-- (capacity_usage) of each location it ships from, when it reserves, so a routed cart keeps its
-- slot. The reservation records those locations and the day it took them. The slot of a
-- location is given back, on the capacity_usage row of that day, when the reservation no longer
-- holds any unit there: released in full, expired, or a partial release of every unit at that
-- location (a partial release that leaves units at a location keeps its slot). A commit keeps
-- the slots: the shipment happens. Units a pickup store supplies from its own shelf for a
-- PICKUP there are not a shipment and take no capacity, so that store is never recorded here.
-- capacity_locations lists the slots still held (emptied when they are given back).
ALTER TABLE reservations ADD COLUMN capacity_day date;
ALTER TABLE reservations ADD COLUMN capacity_locations text[] NOT NULL DEFAULT '{}';

-- The quota check before a new reservation (max_active_reservations, max_units_held) counts an
-- owner's ACTIVE reservations through this index; ended reservations do not weigh on it.
CREATE INDEX reservations_owner_active ON reservations (owner, expires_at) WHERE status = 'ACTIVE';
