"""Order routing solver (DESIGN §5): numba kernels behind a typed front."""

from routing import _numba_cache  # noqa: F401  (first: cache locators before any kernel)
from routing.model import (
    Allocation,
    Exclusion,
    ExclusionReason,
    LineShortfall,
    LocationType,
    Method,
    Order,
    OrderLine,
    Plan,
    Policy,
    RoutingInputError,
    RoutingResult,
    SiteInfo,
    UnknownLocationError,
)
from routing.solver import Network, solve, warm_up

__all__ = [
    "Allocation",
    "Exclusion",
    "ExclusionReason",
    "LineShortfall",
    "LocationType",
    "Method",
    "Network",
    "Order",
    "OrderLine",
    "Plan",
    "Policy",
    "RoutingInputError",
    "RoutingResult",
    "SiteInfo",
    "UnknownLocationError",
    "solve",
    "warm_up",
]
