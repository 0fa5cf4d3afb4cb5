"""Who is calling (auth), what they may touch (entitlements), and how often (rate limits).

The pure core (identity, rate-limit arithmetic, claim rules, the grant model and evaluator) does no I/O;
the adapters beside it (JWKS fetches, grant stores, remote deciders, the Redis-backed ``RateLimiter``) take
their clients from ``accessd.aio`` and this package's ``RemoteClient``. HTTP endpoints over these live in
``accessd.http``.
"""

from ._identity import AuthFailure as AuthFailure
from ._identity import Identity as Identity
from ._identity import Verify as Verify
from ._identity import bearer_token as bearer_token
from ._limiter import RateLimiter as RateLimiter
from ._limiter import build_rate_limiter as build_rate_limiter
from ._limiter import load_tiers as load_tiers
from ._origins import Origins as Origins
from ._ratelimit import STREAMING_CONNECT as STREAMING_CONNECT
from ._ratelimit import KeyedBudget as KeyedBudget
from ._ratelimit import LocalLimiter as LocalLimiter
from ._ratelimit import Network as Network
from ._ratelimit import RateDecision as RateDecision
from ._ratelimit import Tier as Tier
from ._ratelimit import builtin_tiers as builtin_tiers
from ._ratelimit import client_ip as client_ip
from ._ratelimit import gcra as gcra
from ._ratelimit import is_trusted as is_trusted
from ._ratelimit import parse_tiers as parse_tiers
from ._remote import RemoteClient as RemoteClient
from ._response_cache import CachedResponse as CachedResponse
from ._response_cache import CacheKey as CacheKey
from ._response_cache import Fetched as Fetched
from ._response_cache import Invalidated as Invalidated
from ._response_cache import ResponseCache as ResponseCache
from ._response_cache import cache_key as cache_key
from ._response_cache import storable as storable
from ._tickets import StreamTickets as StreamTickets
