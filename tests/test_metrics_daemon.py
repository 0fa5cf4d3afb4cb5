"""``POST /metrics/track`` through real daemons (CONTRACT §11): the validation matrix, the full queue, expiry,
forwarding edge → internal with the internal role away and back, and the stream's per-channel figures."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ._daemon import Daemon, start_daemon, token, wait_until_ready
from ._wait import eventually


def values(base_url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name`` on ``base_url``'s /metrics, by its labels."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def track(base_url: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base_url}/metrics/track", content=content, timeout=5, **kwargs)


@pytest.fixture(scope="module")
def internal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("internal"), role="internal")
    yield daemon
    daemon.stop()


def sample(name: str, kind: str = "counter", value: Any = 1, **labels: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": value, "labels": labels}


BAD = {
    "not an object": ([1], "body", None),
    "unknown field": ({**sample("m_unknown"), "help": "x"}, "help", None),
    "bad name": (sample("1starts_with_digit"), "name", None),
    "name with a dash": (sample("has-dash"), "name", None),
    "reserved prefix": (sample("accessd_http_requests"), "name", None),
    "missing type": ({"name": "m_notype", "value": 1}, "type", None),
    "unknown type": (sample("m_summary", "summary"), "type", None),
    "value a string": (sample("m_str", value="1"), "value", None),
    "value a bool": (sample("m_bool", value=True), "value", None),
    "negative counter": (sample("m_neg", value=-1), "value", None),
    "labels a list": ({**sample("m_ll"), "labels": ["a"]}, "labels", None),
    "bad label name": (sample("m_ln", **{"bad-label": "x"}), "labels.bad-label", None),
    "reserved label name": (sample("m_rl", __name__="x"), "labels.__name__", None),
    "histogram le": (sample("m_le", "histogram", 0.1, le="1"), "labels.le", None),
    "label value not a string": (sample("m_lv", service=3), "labels.service", None),
    "label value too long": (sample("m_long", service="x" * 257), "labels.service", None),
    "too many labels": (sample("m_many", **{f"l{i}": "x" for i in range(17)}), "labels", None),
    "batch not a list": ({"metrics": {}}, "metrics", None),
    "batch empty": ({"metrics": []}, "metrics", None),
    "batch too big": ({"metrics": [sample("m_big")] * 1001}, "metrics", None),
    "batch with other keys": ({"metrics": [sample("m_other")], "x": 1}, "body", None),
    "second of a batch": (
        {"metrics": [sample("m_first"), sample("m_second", value=-2)]},
        "metrics[1].value",
        1,
    ),
    "third not an object": ({"metrics": [sample("m_a"), sample("m_b"), "x"]}, "metrics[2]", 2),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_sample_is_a_400_naming_the_field_and_index_and_keeps_nothing(
    internal: Daemon, case: str
) -> None:
    body, field, index = BAD[case]
    response = track(internal.internal_url, body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == "BAD_REQUEST" and error["details"]["field"] == field
    assert error["details"].get("index") == index
    assert values(internal.internal_url, "m_first_total") == {}  # the valid first sample was not kept


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[" * 100_000])
def test_a_body_that_is_not_json_is_a_400(internal: Daemon, body: bytes) -> None:
    response = track(internal.internal_url, body)
    assert response.status_code == 400 and response.json()["details"]["field"] == "body"


def test_non_finite_values_are_refused(internal: Daemon) -> None:
    for text in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        body = b'{"name":"m_finite","type":"gauge","value":' + text + b"}"
        response = track(internal.internal_url, body)
        assert response.status_code == 400 and response.json()["details"]["field"] == "value", text


def test_a_body_over_the_limit_is_a_413(internal: Daemon) -> None:
    body = {"metrics": [sample("m_huge", service="x" * 256, **{f"l{i}": "y" * 256 for i in range(15)})] * 300}
    assert track(internal.internal_url, body).status_code == 413


def test_type_and_label_clashes_are_409_with_the_index(internal: Daemon) -> None:
    assert track(internal.internal_url, sample("jobs_run", service="a")).status_code == 202
    clashes = [
        ({"metrics": [sample("jobs_run", service="b"), sample("jobs_run", "gauge", 1)]}, "metrics[1].type"),
        ({"metrics": [sample("jobs_run", region="eu")]}, "metrics[0].labels"),
        (sample("jobs_run_total", "gauge", 3), "name"),  # the counter's exposition name
        ({"metrics": [sample("fresh_x", "gauge"), sample("fresh_x", "histogram")]}, "metrics[1].type"),
    ]
    for body, field in clashes:
        response = track(internal.internal_url, body)
        assert response.status_code == 409, response.text
        assert response.json()["code"] == "CONFLICT" and response.json()["details"]["field"] == field
    assert values(internal.internal_url, "jobs_run_total") == {(("service", "a"),): 1}  # nothing else kept
    assert values(internal.internal_url, "fresh_x") == {}
    # the counter answers to its name with or without _total
    assert track(internal.internal_url, sample("jobs_run_total", service="a", value=2)).status_code == 202
    assert values(internal.internal_url, "jobs_run_total") == {(("service", "a"),): 3}


def test_accepted_series_appear_on_metrics_and_parse_back(internal: Daemon) -> None:
    url = internal.internal_url
    response = track(
        url,
        {
            "metrics": [
                sample("curve_recompute_seconds", value=1.5, service="curves"),
                sample("curve_recompute_seconds", value=0.25, service="curves"),
                sample("queue_length", "gauge", 7, queue="risk"),
                sample("queue_length", "gauge", 4, queue="risk"),
                sample("fetch_seconds", "histogram", 0.3, source="ice"),
                sample("fetch_seconds", "histogram", 12, source="ice"),
            ]
        },
    )
    assert response.status_code == 202 and response.json() == {"accepted": 6}
    assert values(url, "curve_recompute_seconds_total") == {(("service", "curves"),): 1.75}
    assert values(url, "queue_length") == {(("queue", "risk"),): 4}
    buckets = values(url, "fetch_seconds_bucket")
    assert buckets[(("le", "0.25"), ("source", "ice"))] == 0
    assert buckets[(("le", "0.5"), ("source", "ice"))] == 1
    assert buckets[(("le", "+Inf"), ("source", "ice"))] == 2
    assert values(url, "fetch_seconds_sum") == {(("source", "ice"),): 12.3}
    assert values(url, "accessd_metrics_flush_duration_seconds_count")[()] >= 1


def test_the_series_cap_is_a_400(internal: Daemon) -> None:
    for start in (0, 1000):
        body = {"metrics": [sample("per_user", user=f"u{i}") for i in range(start, start + 1000)]}
        response = track(internal.internal_url, body)
        if start == 0:
            assert response.status_code == 202
    assert response.status_code == 400 and response.json()["details"] == {
        "field": "metrics[0].labels",
        "problem": response.json()["details"]["problem"],
        "index": 0,
    }
    assert "1000 series" in response.json()["message"]


async def test_a_full_queue_is_a_503_and_what_was_acknowledged_is_all_there(daemon_factory) -> None:
    daemon = daemon_factory(
        role="internal",
        env={"ACCESS_METRICS_QUEUE_SIZE": "100", "ACCESS_METRICS_FLUSH_INTERVAL_S": "3600"},
    )
    body = json.dumps({"metrics": [sample("burst", value=1, n=str(i)) for i in range(60)]}).encode()
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=50)) as client:

        async def post() -> None:
            response = await client.post(f"{daemon.internal_url}/metrics/track", content=body)
            if response.status_code == 503:
                assert response.json()["code"] == "OVERLOADED" and response.headers["Retry-After"] == "3600"
            statuses.append(response.status_code)

        for _ in range(5):  # a burst lands between two flushes: the queue (100) holds one body (60)
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(post)
            if 503 in statuses:
                break
    assert set(statuses) == {202, 503}
    total = sum(values(daemon.internal_url, "burst_total").values())
    assert total == 60 * statuses.count(202)
    overloaded = values(daemon.internal_url, "accessd_metrics_ingested_samples_total")
    assert overloaded[(("result", "overloaded"),)] == 60 * statuses.count(503)


async def test_a_series_not_updated_for_the_ttl_expires(daemon_factory) -> None:
    daemon = daemon_factory(role="internal", env={"ACCESS_METRICS_SERIES_TTL_S": "1"})
    url = daemon.internal_url
    assert track(url, sample("short_lived", "gauge", 5, pod="a")).status_code == 202
    assert values(url, "short_lived") == {(("pod", "a"),): 5}
    await eventually(lambda: values(url, "short_lived") == {}, within=5, what="the series expired")
    assert values(url, "accessd_metrics_series_expired_total")[()] == 1
    assert track(url, sample("short_lived", "counter", 1)).status_code == 202  # the name is free again


async def test_an_edge_forwards_to_the_internal_role_across_its_outage(
    daemon_factory, tmp_path: Path
) -> None:
    internal = daemon_factory(role="internal")
    url = internal.internal_url
    edge = daemon_factory(
        role="edge",
        env={
            "ACCESS_METRICS_ENDPOINT": internal.internal_url,
            "ACCESS_METRICS_FORWARD_INTERVAL_S": "0.1",
            "ACCESS_METRICS_FORWARD_BUFFER": "30",
        },
    )
    bearer = {"Authorization": f"Bearer {token(edge, 'svc')}"}
    assert track(edge.edge_url, sample("edge_jobs")).status_code == 401  # a token is required on the edge
    assert track(edge.edge_url, sample("edge_jobs", value=-1), headers=bearer).status_code == 400
    assert track(edge.edge_url, sample("edge_jobs", value=2, pod="a"), headers=bearer).status_code == 202
    await eventually(lambda: values(url, "edge_jobs_total") == {(("pod", "a"),): 2}, within=10)

    internal.stop()
    for _ in range(40):  # 40 one-sample bodies while the internal role is away: the newest 30 are kept
        assert track(edge.edge_url, sample("edge_jobs", value=1, pod="a"), headers=bearer).status_code == 202
    assert values(edge.edge_url, "accessd_metrics_ingest_queue_depth")[()] == 30
    # back on the same address, as after a rolling restart
    again = daemon_factory(role="internal", env={"ACCESS_INTERNAL_BIND": url[7:]}, wait_ready=False)
    wait_until_ready(again, url)
    await eventually(
        lambda: values(url, "edge_jobs_total") == {(("pod", "a"),): 30},
        within=30,
        what="forwarded",
    )
    forwarded = values(edge.edge_url, "accessd_metrics_forwarded_samples_total")
    assert forwarded[(("result", "dropped"),)] == 10 and forwarded[(("result", "sent"),)] == 31


async def test_the_stream_posts_its_per_channel_figures(daemon_factory) -> None:
    daemon = daemon_factory(role="all", args=["--demo"], env={"ACCESS_STREAM_REPORT_INTERVAL_S": "0.2"})
    channel = "pricing.curve.updates.v1"
    url = f"{daemon.stream_url}/sse/stream?channel={channel}&token={token(daemon, 'viewer', tenant='demo')}"
    async with httpx.AsyncClient(timeout=10) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        with trio.fail_after(10):
            async for line in lines:
                if line.startswith("data: "):
                    break

        def figures() -> bool:
            subscribers = values(daemon.internal_url, "stream_channel_subscribers")
            messages = values(daemon.internal_url, "stream_channel_messages_total")
            return any(dict(k)["channel"] == channel and v == 1 for k, v in subscribers.items()) and any(
                v >= 1 for v in messages.values()
            )

        await eventually(figures, within=10, what="the stream's figures on /metrics")
    deliveries = values(daemon.internal_url, "stream_channel_deliveries_total")
    (labels,) = deliveries
    assert dict(labels)["edge"] and not math.isnan(deliveries[labels])
