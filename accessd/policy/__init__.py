"""Who is calling (auth), what they may touch (entitlements), and how often (rate-limit arithmetic).

The pure core (identity, rate-limit arithmetic, claim rules, the grant model and evaluator) does no I/O;
the adapters beside it (JWKS fetches, grant stores, remote deciders) take their clients from ``accessd.aio``
and this package's ``RemoteClient``. HTTP endpoints over these live in ``accessd.http``.
"""

from ._identity import AuthFailure as AuthFailure
from ._identity import Identity as Identity
from ._identity import Verify as Verify
from ._identity import bearer_token as bearer_token
from ._ratelimit import KeyedBudget as KeyedBudget
from ._ratelimit import Network as Network
from ._ratelimit import client_ip as client_ip
from ._ratelimit import is_trusted as is_trusted
from ._remote import RemoteClient as RemoteClient
