"""Small shared primitives every layer may use: retry backoff, token buckets, dependency states.

They sit below every package that owns a backend (``aio``, ``nurseries``, ``policy``, ``stream``) and above
only ``settings`` and ``errors``, so each of those uses the one formula instead of writing its own. Nothing
here does I/O; time is Trio's clock (``trio.current_time()``), so tests drive it with ``autojump_clock``.
"""

from ._backoff import Backoff as Backoff
from ._backoff import Retries as Retries
from ._breaker import BreakerState as BreakerState
from ._breaker import CircuitBreaker as CircuitBreaker
from ._dependency import DependencyReporter as DependencyReporter
from ._dependency import DependencyState as DependencyState
from ._dependency import ReportsHealth as ReportsHealth
from ._dependency import ignore_state as ignore_state
from ._token_bucket import TokenBucket as TokenBucket
