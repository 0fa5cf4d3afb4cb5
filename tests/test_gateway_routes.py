"""The routes file: validation (one error naming the route and field), matching, and the circuit breaker."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
import trio.testing

from accessd.errors import BadRequest, InvalidInput
from accessd.http._routes import RouteTable, parse_routes
from accessd.primitives import BreakerState, CircuitBreaker

UP = {"curves": {"url": "http://127.0.0.1:9001", "timeout_s": 5}}


def table(*routes: dict[str, Any]) -> RouteTable:
    return parse_routes({"upstreams": UP, "routes": list(routes)})


def route(path: str, **fields: Any) -> dict[str, Any]:
    return {"path": path, "upstream": "curves", **fields}


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ({"routes": [route("/a")]}, "routes[0].upstream", "unknown upstream"),
        ({"upstreams": {"x": {"url": "ftp://h"}}}, "upstreams.x.url", "not an http(s) URL"),
        ({"upstreams": {"x": {"url": "http://h:99999"}}}, "upstreams.x.url", "Port out of range"),
        ({"upstreams": {"x": {}}}, "upstreams.x.url", "missing"),
        ({"upstreams": UP, "routes": [route("a/b")]}, "routes[0].path", "starting with '/'"),
        ({"upstreams": UP, "routes": [route("/a/{x}/{x}")]}, "routes[0].path", "twice"),
        ({"upstreams": UP, "routes": [route("/a/x{y}")]}, "routes[0].path", "whole segment"),
        (
            {"upstreams": UP, "routes": [route("/a/{x}", upstream_path="/b/{y}")]},
            "routes[0].upstream_path",
            "not in the path",
        ),
        (
            {
                "upstreams": UP,
                "routes": [route("/a/{x}", entitlement={"action": "read", "resource": "c:{z}"})],
            },
            "routes[0].entitlement.resource",
            "not in the path",
        ),
        ({"upstreams": UP, "routes": [route("/a", methods=["FETCH"])]}, "routes[0].methods", "not one of"),
        ({"upstreams": UP, "routes": [route("/a", tier="vip")]}, "routes[0].tier", "not one of"),
        (
            {"upstreams": UP, "routes": [route("/a", methods=["POST"], cache_ttl_s=5)]},
            "routes[0].cache_ttl_s",
            "GET",
        ),
        ({"upstreams": UP, "routes": [route("/a", colour="red")]}, "routes[0].colour", "unknown field"),
        ({"upstreams": UP, "routes": [route("/a/{x}"), route("/a/{y}")]}, "routes[1].path", "same paths"),
        (
            {"upstreams": UP, "routes": [route("/a/{x}/c"), route("/a/b/{y}")]},
            "routes[1].path",
            "neither more literal",
        ),
        ({"upstreams": UP, "routes": [route("/a"), route("/a")]}, "routes[1].methods", "also routes[0]"),
        ({"upstreams": UP, "routes": {"path": "/a"}}, "routes", "expected a list"),
        ({"upstreams": UP, "extra": 1}, "extra", "unknown top-level key"),
    ],
)
def test_a_bad_routes_file_names_the_route_and_field(data: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_routes(data)
    assert info.value.field == field
    assert problem in info.value.problem


def test_literal_segments_win_and_methods_pick_among_matches() -> None:
    t = table(
        route("/api/v1/curves/{curve_id}", methods=["GET"]),
        route("/api/v1/curves/latest", methods=["GET"]),
        route("/api/v1/curves/{curve_id}/points", methods=["GET", "POST"]),
        route("/api/v1/{anything}/{curve_id}", methods=["DELETE"]),
    )
    latest = t.match("GET", "/api/v1/curves/latest")
    assert latest is not None and latest.route is not None and latest.template == "/api/v1/curves/latest"
    one = t.match("GET", "/api/v1/curves/NG%5F2026")
    assert one is not None and one.route is not None
    assert one.raw_params == {"curve_id": "NG%5F2026"} and one.params == {"curve_id": "NG_2026"}
    deleted = t.match("DELETE", "/api/v1/curves/NG")  # the literal template does not serve DELETE: the other
    assert (
        deleted is not None
        and deleted.route is not None
        and deleted.template == "/api/v1/{anything}/{curve_id}"
    )
    head = t.match("HEAD", "/api/v1/curves/NG")
    assert head is not None and head.route is not None  # HEAD is served by GET
    other = t.match("PUT", "/api/v1/curves/NG/points")
    assert other is not None and other.route is None and other.allowed == {"GET", "POST"}
    assert t.match("GET", "/api/v1/curves") is None
    assert t.match("GET", "/api/v1/curves/NG/") is None  # a trailing slash is another path


def test_rewrites_keep_the_raw_segment_and_the_query() -> None:
    t = table(
        route(
            "/api/v1/curves/{curve_id}",
            upstream_path="/curves/{curve_id}",
            entitlement={"action": "read", "resource": "curve:{curve_id}"},
        )
    )
    m = t.match("GET", "/api/v1/curves/NG%20X")
    assert m is not None and m.route is not None
    assert m.route.target(m.raw_params, b"page=2&filters=a%2Cb") == "/curves/NG%20X?page=2&filters=a%2Cb"
    assert m.route.resource(m.params) == "curve:NG X"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/curves/..",
        "/api/v1/curves/%2e%2E",
        "/api/v1/curves/a%2Fb",
        "/api/v1/curves/%ZZ",
        "/api/v1/curves/%FF",
        "http://evil/x",
    ],
)
def test_paths_that_must_not_be_forwarded_are_400(path: str) -> None:
    t = table(route("/api/v1/curves/{curve_id}"))
    with pytest.raises(BadRequest):
        t.match("GET", path)


def test_matching_500_routes_costs_about_what_10_do() -> None:
    """Not a benchmark (bench/gateway.py measures): a guard against a per-route scan, with a wide margin."""

    def build(n: int) -> RouteTable:
        return table(*(route(f"/api/v1/r{i}/{{id}}/items/{{item}}") for i in range(n)))

    def cost(t: RouteTable) -> float:
        start = time.perf_counter()
        for i in range(20_000):
            t.match("GET", f"/api/v1/r{i % 10}/x/items/y")
        return time.perf_counter() - start

    small, large = build(10), build(500)
    assert min(cost(large) for _ in range(3)) < 3 * min(cost(small) for _ in range(3))


async def test_the_breaker_opens_refuses_half_opens_and_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    states: list[BreakerState] = []
    breaker = CircuitBreaker(consecutive=3, open_s=10, on_change=states.append)
    for _ in range(3):
        assert breaker.allow() == 0.0
        breaker.record(False)
    assert breaker.state is BreakerState.OPEN and 9 < breaker.allow() <= 10
    await trio.sleep(10)
    assert breaker.allow() == 0.0 and breaker.state is BreakerState.HALF_OPEN  # the probe
    assert breaker.allow() > 0  # the others wait for its answer
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN
    await trio.sleep(10)
    assert breaker.allow() == 0.0
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED and breaker.allow() == 0.0
    assert states == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


async def test_the_breaker_opens_on_an_error_ratio(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker(consecutive=100, error_ratio=0.5, min_calls=20, window_s=10)
    for i in range(19):
        breaker.record(i % 2 == 0)  # 9 failures in 19: not enough calls yet
        await trio.sleep(0.1)
    assert breaker.state is BreakerState.CLOSED
    breaker.record(False)  # 10 of 20
    assert breaker.state is BreakerState.OPEN
    fresh = CircuitBreaker(consecutive=100, min_calls=4, window_s=2)
    fresh.record(False)
    fresh.record(False)
    await trio.sleep(5)  # those failures left the window
    fresh.record(True)
    fresh.record(False)
    assert fresh.state is BreakerState.CLOSED
