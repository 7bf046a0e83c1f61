"""Returns that match what was sold (DESIGN §8): a return names its sale and never brings back
more of a SKU than that sale sold less what earlier returns against it booked. Pure rules, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inventory_svc.domain.errors import ReturnExceedsSale
from inventory_svc.domain.model import SkuQuantity


class Disposition(enum.StrEnum):
    """What becomes of returned goods. Only SELLABLE goes back on the shelf (on_hand); the
    others are booked as returned but never counted as available."""

    SELLABLE = "SELLABLE"
    INSPECTION = "INSPECTION"
    WRITE_OFF = "WRITE_OFF"


@dataclass(frozen=True, slots=True)
class SaleRef:
    """The sale a return names: a committed reservation (with the order_ref it was sold under),
    an order_ref alone (every sale with it), or neither (an unmatched return)."""

    reservation_id: str = ""
    order_ref: str = ""

    @property
    def unmatched(self) -> bool:
        return not (self.reservation_id or self.order_ref)

    @property
    def lock_name(self) -> str:
        """What concurrent returns against this sale serialise on. A reservation sold under an
        order_ref shares its order's lock: a return by reservation and one by its order draw on
        the same units."""
        if self.order_ref:
            return f"order\0{self.order_ref}"
        return f"reservation\0{self.reservation_id}"

    def __str__(self) -> str:
        if self.reservation_id:
            return f"reservation {self.reservation_id!r}"
        return f"order {self.order_ref!r}" if self.order_ref else "no sale"


@dataclass(frozen=True, slots=True)
class SaleBalance:
    """One scope a return must stay within, by SKU: units sold (SALE movements) and units that
    earlier returns against it booked (every disposition)."""

    name: str
    sold: Mapping[str, int]
    returned: Mapping[str, int]

    def returnable(self, sku: str) -> int:
        return max(0, self.sold.get(sku, 0) - self.returned.get(sku, 0))


@dataclass(frozen=True, slots=True)
class ReturnedLine:
    """One line of a booked return: units back now, what the sale sold of the SKU and what is
    still returnable after this return (both 0 for an unmatched return)."""

    sku: str
    quantity: int
    sold: int
    returnable: int


def check_return(items: Sequence[SkuQuantity], balances: Sequence[SaleBalance]
                 ) -> tuple[ReturnedLine, ...]:
    """The lines a return books, or ReturnExceedsSale naming every line beyond what is left.

    `balances` are the scopes the sale belongs to, the one named first: a reservation and the
    order it was sold under (a return by order may have taken its units already), or just an
    order. None: an unmatched return, which no sale limits (who may book one is the caller's
    rule)."""
    if not balances:
        return tuple(ReturnedLine(x.sku, x.quantity, 0, 0) for x in items)
    left = {x.sku: min(b.returnable(x.sku) for b in balances) for x in items}
    over = tuple((x.sku, x.quantity, left[x.sku]) for x in items if x.quantity > left[x.sku])
    if over:
        raise ReturnExceedsSale(balances[0].name, over)
    return tuple(ReturnedLine(x.sku, x.quantity, balances[0].sold.get(x.sku, 0),
                              left[x.sku] - x.quantity) for x in items)
