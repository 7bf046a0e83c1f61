"""The numba solver against the brute-force reference on thousands of small instances."""

from __future__ import annotations

import random

import numpy as np
import pytest

from routing import Network, Plan, Policy, RoutingResult, solve
from routing.reference import reference_solve
from tests.routing.checks import check_plan, close
from tests.routing.gen import Instance, make_instance


def plans(result: RoutingResult) -> list[Plan]:
    return [result.plan, *result.alternatives] if result.plan else []


def location_set(plan: Plan) -> list[str]:
    return sorted(a.location_id for a in plan.allocations)


def compare(inst: Instance, seed: int) -> None:
    got = solve(Network(inst.sites), inst.order, np.array(inst.stock), inst.capacity)
    exp = reference_solve(inst.sites, inst.order, inst.stock, inst.capacity)
    ctx = f"seed={seed} order={inst.order}"
    assert (got.plan is None) == (exp.plan is None), ctx
    g, e = plans(got), plans(exp)
    assert len(g) == len(e), ctx
    for a, b in zip(g, e, strict=True):
        assert close(a.cost, b.cost), ctx
        assert location_set(a) == location_set(b), ctx
        check_plan(inst.sites, inst.order, inst.stock, inst.capacity, a)
    assert got.exclusions == exp.exclusions, ctx
    assert got.shortfall == exp.shortfall, ctx
    assert got.suggested_pickup_ids == exp.suggested_pickup_ids, ctx


@pytest.mark.parametrize("block", range(10))
def test_optimal_matches_reference(block: int) -> None:
    for seed in range(block * 600, (block + 1) * 600):
        compare(make_instance(random.Random(seed)), seed)


def test_fewest_splits_matches_reference() -> None:
    for seed in range(100_000, 100_600):
        compare(make_instance(random.Random(seed), Policy.FEWEST_SPLITS), seed)


def test_instances_cover_the_hard_cases() -> None:
    """The generator really produces what the oracle test claims to cover."""
    seen: dict[str, int] = {}

    def bump(key: str) -> None:
        seen[key] = seen.get(key, 0) + 1

    for seed in range(6000):
        inst = make_instance(random.Random(seed))
        o = inst.order
        res = solve(Network(inst.sites), o, np.array(inst.stock), inst.capacity)
        bump("pickup" if o.pickup_location_id else "ship")
        bump(f"max_shipments={o.max_shipments}")
        bump("no_split" if not o.split_lines else "split")
        bump("max_distance" if o.max_distance_km is not None else "any_distance")
        bump("excluded" if o.excluded else "none_excluded")
        bump("capacity_0" if 0 in (inst.capacity or [s.capacity_left for s in inst.sites])
             else "capacity_ok")
        bump("infeasible" if res.plan is None else f"used={res.plan.locations_used}")
        if res.plan and any(close(p.cost, res.plan.cost) for p in res.alternatives):
            bump("tie")
        if len({(s.lat, s.lon) for s in inst.sites}) < len(inst.sites):
            bump("same_coordinates")
        if any(r.reason.name == "TOO_FAR" for r in res.exclusions):
            bump("too_far")
        if res.suggested_pickup_ids:
            bump("suggestions")
    for key in ("pickup", "no_split", "max_distance", "excluded", "capacity_0", "infeasible",
                "used=1", "used=2", "used=3", "used=4", "tie", "same_coordinates", "too_far",
                "suggestions", "max_shipments=1", "max_shipments=4"):
        assert seen.get(key, 0) >= 10, (key, seen)
