"""The exception tree of accessd.

Policy denials (a bad token, a missing grant, an exhausted bucket) are result values, not exceptions;
exceptions are for faults. Third-party exceptions are translated at the adapter edge.

    AccessdError
     ├── ConfigError            a setting is unknown or has a bad value (exit 2)
     ├── StartupError           a component could not become ready within its deadline (exit 2)
     └── BackendUnavailable     a configured backend (redis, postgres, kafka, jwks) cannot be reached
"""

from __future__ import annotations


class AccessdError(Exception):
    """Root of every error accessd raises on purpose."""


class ConfigError(AccessdError):
    """A setting is unknown or invalid. ``setting`` names it as the operator wrote it (env name)."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class StartupError(AccessdError):
    """A component failed to start, or did not become ready in time."""

    def __init__(self, component: str, problem: str) -> None:
        super().__init__(f"component {component!r} could not start: {problem}")
        self.component = component
        self.problem = problem


class BackendUnavailable(AccessdError):
    """A configured backend cannot be reached; callers degrade or answer 503, never allow."""

    def __init__(self, backend: str, problem: str = "unreachable") -> None:
        super().__init__(f"{backend}: {problem}")
        self.backend = backend
        self.problem = problem
