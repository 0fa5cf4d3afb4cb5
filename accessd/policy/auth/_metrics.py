"""The auth series of CONTRACT §12, registered on the daemon's registry (one set per daemon, no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# A JWKS fetch is a round trip to the IdP: milliseconds when healthy, the fetch timeout when not.
REFRESH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Results of accessd_token_validations_total.
RESULTS = ("valid", "cached", "expired", "invalid", "missing", "unavailable")


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.validations = Counter(
            "accessd_token_validations",
            "Token verifications by result (cached: answered from the verified-token cache)",
            ("result",),
            registry=registry,
        )
        self.jwks_refresh = Histogram(
            "accessd_jwks_refresh_duration_seconds",
            "Duration of JWKS fetches, successful or not",
            buckets=REFRESH_BUCKETS,
            registry=registry,
        )
        # every series visible from the start, at zero; the children kept (labels() per call costs a lock)
        self.validated = {result: self.validations.labels(result) for result in RESULTS}
