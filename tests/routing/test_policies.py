"""Each policy's documented behaviour, and the OPTIMAL tie-breaks, on hand-made cases."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from routing import Network, Policy, solve
from tests.routing.checks import check_plan
from tests.routing.gen import make_instance
from tests.routing.helpers import GDANSK, KRAKOW, LODZ, POZNAN, WARSAW, route, ship_order, site, units


def test_priority_fills_sources_in_priority_order_like_magento_msi() -> None:
    # Magento MSI "source priority": take what the first source has, then the next one, ...
    sites = [
        site("source-c", priority=3, cost_per_unit=0.1),
        site("source-a", priority=1),
        site("source-b", priority=2),
    ]
    stock = [[20], [2], [5]]
    res = route(sites, ship_order(6, policy=Policy.PRIORITY), stock)
    assert units(res) == {"source-a": (2,), "source-b": (4,)}
    # OPTIMAL would rather ship everything from the cheap source-c.
    assert units(route(sites, ship_order(6), stock)) == {"source-c": (6,)}


def test_priority_ties_break_by_id() -> None:
    sites = [site("b", priority=1), site("a", priority=1)]
    res = route(sites, ship_order(1, policy=Policy.PRIORITY), [[5], [5]])
    assert units(res) == {"a": (1,)}


def test_closest_takes_the_nearest_source_first() -> None:
    # Magento distance-based SSA / Shopify: nearest location to the customer first.
    sites = [site("gdansk", GDANSK), site("lodz", LODZ), site("warsaw", WARSAW),
             site("krakow", KRAKOW)]
    stock = [[10], [10], [1], [10]]
    res = route(sites, ship_order(3, to=WARSAW, policy=Policy.CLOSEST), stock)
    assert units(res) == {"warsaw": (1,), "lodz": (2,)}
    assert res.plan is not None
    assert {a.location_id: round(a.distance_km) for a in res.plan.allocations} == {
        "warsaw": 0, "lodz": 119}


def test_closest_ties_break_by_id() -> None:
    sites = [site("z", POZNAN), site("y", POZNAN)]
    res = route(sites, ship_order(1, policy=Policy.CLOSEST), [[1], [1]])
    assert units(res) == {"y": (1,)}


def test_highest_stock_starts_with_the_location_holding_most_units() -> None:
    # Saleor "prioritize high stock": most units of the order's SKUs first.
    sites = [site("small", priority=1), site("big", priority=9), site("mid", priority=5)]
    stock = [[3, 3], [10, 0], [5, 4]]
    res = route(sites, ship_order(2, 2, policy=Policy.HIGHEST_STOCK), stock)
    assert units(res) == {"big": (2, 0), "mid": (0, 2)}


def test_fewest_splits_prefers_one_location_even_if_dearer() -> None:
    sites = [site("a", fixed_cost=1.0), site("b", fixed_cost=1.0), site("all", fixed_cost=50.0)]
    stock = [[1, 0], [0, 1], [1, 1]]
    assert units(route(sites, ship_order(1, 1), stock)) == {"a": (1, 0), "b": (0, 1)}
    res = route(sites, ship_order(1, 1, policy=Policy.FEWEST_SPLITS), stock)
    assert units(res) == {"all": (1, 1)}
    # The alternatives are the best OPTIMAL plans, here the cheaper split.
    assert sorted(a.location_id for a in res.alternatives[0].allocations) == ["a", "b"]


def test_fewest_splits_then_cheapest() -> None:
    sites = [site("x", fixed_cost=9.0), site("y", fixed_cost=7.0), site("z", fixed_cost=8.0)]
    res = route(sites, ship_order(2, policy=Policy.FEWEST_SPLITS), [[2], [2], [2]])
    assert units(res) == {"y": (2,)}


def test_walk_skips_a_source_that_would_break_max_shipments() -> None:
    # Plain greedy would take a, b (1 of 2) and c: three locations, over the limit of two.
    sites = [site("a", priority=1), site("b", priority=2), site("c", priority=3)]
    stock = [[1, 0], [0, 1], [0, 2]]
    res = route(sites, ship_order(1, 2, policy=Policy.PRIORITY, max_shipments=2), stock)
    assert units(res) == {"a": (1, 0), "c": (0, 2)}
    res = route(sites, ship_order(1, 2, policy=Policy.PRIORITY, max_shipments=3), stock)
    assert units(res) == {"a": (1, 0), "b": (0, 1), "c": (0, 1)}


def test_walk_without_split_lines_takes_whole_lines_only() -> None:
    sites = [site("a", priority=1), site("b", priority=2)]
    stock = [[1, 3], [2, 0]]
    res = route(sites, ship_order(2, 3, policy=Policy.PRIORITY, split_lines=False), stock)
    assert units(res) == {"a": (0, 3), "b": (2, 0)}


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_finds_a_valid_plan_exactly_when_one_exists(policy: Policy) -> None:
    for seed in range(400):
        inst = make_instance(random.Random(seed), policy)
        net = Network(inst.sites)
        res = solve(net, inst.order, np.array(inst.stock), inst.capacity)
        opt = solve(net, replace(inst.order, policy=Policy.OPTIMAL), np.array(inst.stock),
                    inst.capacity)
        assert (res.plan is None) == (opt.plan is None), seed
        if res.plan is not None and opt.plan is not None:
            check_plan(inst.sites, inst.order, inst.stock, inst.capacity, res.plan)
            assert res.plan.cost >= opt.plan.cost - 1e-9 * max(1.0, opt.plan.cost)
            chosen = sorted(a.location_id for a in res.plan.allocations)
            for alt in res.alternatives:
                assert sorted(a.location_id for a in alt.allocations) != chosen
                check_plan(inst.sites, inst.order, inst.stock, inst.capacity, alt)


def test_optimal_equal_cost_prefers_fewer_locations() -> None:
    sites = [site("pair-1", fixed_cost=4.0), site("pair-2", fixed_cost=4.0),
             site("single", fixed_cost=8.0, priority=9)]
    stock = [[1], [1], [2]]
    res = route(sites, ship_order(2), stock)
    assert units(res) == {"single": (2,)}
    assert res.plan is not None and res.plan.cost == 10.0
    assert res.alternatives[0].cost == 10.0
    assert res.alternatives[0].locations_used == 2


def test_optimal_equal_cost_prefers_lower_priority_then_id() -> None:
    sites = [site("b"), site("a"), site("c", priority=0)]
    assert units(route(sites[:2], ship_order(1), [[1], [1]])) == {"a": (1,)}
    assert units(route(sites, ship_order(1), [[1], [1], [1]])) == {"c": (1,)}


def test_optimal_ties_compare_sorted_priority_id_lists() -> None:
    # Every pair costs the same; sorted (priority, id) lists order them:
    # [(1, z), (2, c)] < [(1, z), (3, a)] < [(2, b), (2, c)] < [(2, b), (3, a)].
    sites = [site("z", priority=1), site("a", priority=3), site("b", priority=2),
             site("c", priority=2)]
    stock = [[1, 0], [0, 1], [1, 0], [0, 1]]
    res = route(sites, ship_order(1, 1, top_k=5), stock)
    assert sorted(units(res)) == ["c", "z"]
    sets = [sorted(a.location_id for a in p.allocations) for p in res.alternatives]
    assert sets == [["a", "z"], ["b", "c"], ["a", "b"]]


def test_equally_cheap_units_can_make_a_pair_a_plan() -> None:
    # With equal cost_per_unit, {a, b} sharing the units is as cheap as {a} alone plus b's
    # (zero) ship cost: a distinct plan, listed after the singles (fewer locations first).
    sites = [site("a", fixed_cost=0.0), site("b", fixed_cost=0.0)]
    res = route(sites, ship_order(2, top_k=3), [[2], [2]])
    assert units(res) == {"a": (2,)}
    assert [{a.location_id: a.units for a in p.allocations} for p in res.alternatives] == [
        {"b": (2,)}, {"a": (1,), "b": (1,)}]


def test_optimal_splits_when_cheaper_and_respects_max_shipments() -> None:
    sites = [site("near", fixed_cost=1.0), site("far", fixed_cost=20.0)]
    stock = [[1, 0], [1, 1]]
    res = route(sites, ship_order(1, 1, split_penalty=2.0), stock)
    assert units(res) == {"far": (1, 1)}
    res = route(sites, ship_order(1, 1, split_penalty=0.0), stock)
    assert units(res) == {"far": (1, 1)}
    sites[1] = site("far", fixed_cost=20.0, cost_per_unit=30.0)
    res = route(sites, ship_order(1, 1, split_penalty=0.0), stock)
    assert units(res) == {"near": (1, 0), "far": (0, 1)}
    assert route(sites, ship_order(1, 1, max_shipments=1), [[1, 0], [1, 0]]).plan is None
