"""Great-circle distance (DESIGN §5): one formula, a plain and a numba version."""

from __future__ import annotations

import math

from numba import njit

EARTH_RADIUS_KM = 6371.0088


def haversine_rad(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Distance in km between two points given in radians (plain Python)."""
    s_lat = math.sin((lat2 - lat1) * 0.5)
    s_lon = math.sin((lon2 - lon1) * 0.5)
    a = s_lat * s_lat + math.cos(lat1) * math.cos(lat2) * s_lon * s_lon
    return 2.0 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Distance in km between two points given in degrees (plain Python)."""
    return haversine_rad(
        math.radians(lat1), math.radians(lon1), math.radians(lat2), math.radians(lon2)
    )


# The same source compiled by numba: identical math, usable inside kernels.
haversine_rad_nb = njit(cache=True, inline="always")(haversine_rad)
