"""deploy/observability/ against promtool and a real daemon: the rules load and pass their unit tests (a
firing and a quiet case per alert), the dashboard's queries parse, and every metric either of them names, and
every name of CONTRACT §12, is on ``GET /metrics`` of ``accessd run --demo``, an exposition promtool finds no
fault in. promtool missing fails the run with the fix; it is never a skip."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ._daemon import Daemon, start_daemon, token

OBSERVABILITY = Path(__file__).parents[1] / "deploy" / "observability"
RULES = OBSERVABILITY / "prometheus" / "accessd-rules.yaml"
RULE_TESTS = OBSERVABILITY / "prometheus" / "accessd-rules.test.yaml"
DASHBOARD = OBSERVABILITY / "grafana" / "accessd-dashboard.json"
# CONTRACT §12, as written there (counters with _total, histograms by their base name).
CONTRACT_METRICS = (
    "accessd_http_requests_total",
    "accessd_http_request_duration_seconds",
    "accessd_upstream_requests_total",
    "accessd_cache_requests_total",
    "accessd_ratelimit_decisions_total",
    "accessd_token_validations_total",
    "accessd_jwks_refresh_duration_seconds",
    "accessd_entitlement_decisions_total",
    "accessd_entitlement_eval_duration_seconds",
    "accessd_stream_connections",
    "accessd_stream_messages_delivered_total",
    "accessd_stream_delivery_lag_seconds",
    "accessd_stream_dropped_total",
    "accessd_metrics_ingest_queue_depth",
    "accessd_metrics_flush_duration_seconds",
    "accessd_task_restarts_total",
)
# A series name, not part of a recording rule's level:metric:operations name (those are ours, not the daemon's).
METRIC_NAME = re.compile(r"(?<![\w:])accessd_\w+(?![\w:])")
# Grafana's variables, replaced by values PromQL accepts so that promtool can parse the dashboard's queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*"}
# The series names a family of each type puts on /metrics (Prometheus stores these, not the family name).
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}
DEMO_CHANNEL = "pricing.curve.updates.v1"
SSE_DEADLINE_S = 10.0


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:  # loud: a skip would let broken rules or a broken exposition through unnoticed
        pytest.fail(
            "promtool is not on PATH; it checks deploy/observability/ and the /metrics exposition. Install it: "
            "`apt-get install prometheus` (Debian package; .ci/run does this), or put the promtool binary of a "
            "Prometheus release on PATH.",
            pytrace=False,
        )
    return subprocess.run([path, *args], input=stdin, capture_output=True, text=True, timeout=120)


def assert_clean(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, (
        f"{' '.join(map(str, done.args))} → {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def referenced_metrics() -> dict[str, set[str]]:
    """Every accessd series name each file of deploy/observability/ uses, by file."""
    files = (DASHBOARD, RULES, RULE_TESTS)
    return {path.name: set(METRIC_NAME.findall(path.read_text())) for path in files}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_the_rules_load_and_pass_their_unit_tests() -> None:
    assert_clean(promtool("check", "rules", str(RULES)))
    assert_clean(promtool("test", "rules", str(RULE_TESTS)))


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    assert alerts, "no alerts in the rules file"
    assert alerts - {c["alertname"] for c in cases if c.get("exp_alerts")} == set(), (
        "alerts never seen firing"
    )
    assert alerts - {c["alertname"] for c in cases if not c.get("exp_alerts")} == set(), (
        "alerts never seen quiet"
    )


def test_the_dashboard_imports_anywhere_and_its_queries_parse(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    # Every query goes to the chosen data source, none to a uid of some other Grafana.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            uids = {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])}
            assert uids == {"${datasource}"}, panel["title"]
    queries = dashboard_queries()
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    assert not [q for q in queries if "$" in q], "a Grafana variable the test does not know"
    # promtool parses PromQL only inside rule files: one recording rule per query.
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q{i}", "expr": q} for i, q in enumerate(queries)]}
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    assert_clean(promtool("check", "rules", str(path)))


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``GET /metrics`` of ``accessd run --demo`` after traffic that gives the labelled series children."""
    daemon = start_daemon(tmp_path_factory.mktemp("observability"), args=["--demo"])
    try:
        yield exercise(daemon)
    finally:
        daemon.stop()


def exercise(daemon: Daemon) -> str:
    """Proxied GETs (a cache miss, then a hit), an entitlement denial, and one SSE delivery; scraped while the
    subscriber is still connected."""
    bearer = token(daemon, "observer", tenant="demo")
    with httpx.Client(base_url=f"{daemon.edge_url}/api/v1/demo", timeout=10) as client:
        headers = {"Authorization": f"Bearer {bearer}"}
        assert client.get("/curves", headers=headers).status_code == 200
        assert [client.get("/curves/NG_2026", headers=headers).headers["x-cache"] for _ in range(2)] == [
            "MISS",
            "HIT",
        ]
        assert client.get("/curves/ACME_PRIVATE_2026", headers=headers).status_code == 403
        url = f"{daemon.stream_url}/sse/stream?channel={DEMO_CHANNEL}&token={bearer}"
        with client.stream("GET", url) as sse:
            assert sse.status_code == 200
            deadline = time.monotonic() + SSE_DEADLINE_S  # each read is capped by the client's timeout
            for line in sse.iter_lines():
                if line.startswith("data: "):
                    break
                assert time.monotonic() < deadline, "no message from the demo feed"
            response = client.get(f"{daemon.edge_url}/metrics")
    assert response.status_code == 200
    return response.text


def exposed_series(text: str) -> tuple[set[str], set[str]]:
    """(family names, the series names Prometheus stores from them) of an exposition."""
    families = list(text_string_to_metric_families(text))
    series = {
        family.name + suffix for family in families for suffix in SERIES_SUFFIXES.get(family.type, ("",))
    }
    return {family.name for family in families}, series


def test_every_contract_metric_is_exposed(exposition: str) -> None:
    families, _ = exposed_series(exposition)
    missing = [name for name in CONTRACT_METRICS if name.removesuffix("_total") not in families]
    assert missing == [], f"CONTRACT §12 metrics not on /metrics: {missing}"


def test_every_metric_the_dashboard_and_rules_use_is_exposed(exposition: str) -> None:
    _, series = exposed_series(exposition)
    used = referenced_metrics()
    assert used[DASHBOARD.name] and used[RULES.name]
    missing = {file: sorted(names - series) for file, names in used.items() if names - series}
    assert missing == {}, (
        f"series used but not on /metrics (a typo, or a _total/_bucket the type lacks): {missing}"
    )


def test_promtool_finds_no_fault_in_the_exposition(exposition: str) -> None:
    # Warnings count too: promtool prints lint findings (and exits non-zero), a clean exposition prints nothing.
    done = promtool("check", "metrics", stdin=exposition)
    assert_clean(done)
    assert (done.stdout + done.stderr).strip() == ""
