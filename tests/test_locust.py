"""bench/locustfile.py against a real ``--demo`` daemon for two seconds: the load scenario cannot rot."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"


def test_the_locust_scenario_runs_clean(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(role="all", args=["--demo"])
    env = {**daemon.env, "ACCESSD_INTERNAL_URL": daemon.internal_url}
    done = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(BENCH / "locustfile.py"), "--headless", "-u", "5", "-r", "5",
            "-t", "2s", "--host", daemon.edge_url, "--csv", str(tmp_path / "run"), "--only-summary",
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader((tmp_path / "run_stats.csv").open())}
    assert int(rows["Aggregated"]["Request Count"]) > 20
    assert int(rows["Aggregated"]["Failure Count"]) == 0, rows
    for name in ("/api/v1/demo/curves/{curve_id}", "/auth/verify", "/entitlements/check"):
        assert int(rows[name]["Request Count"]) > 0
