"""Entitlements: tenant-scoped grants (Postgres or a YAML policy file), cached decisions, instant revocation.

The one function the rest of accessd calls is ``Decider.decide(identity_or_None, DecisionInput)``
(:class:`Entitlements` in-process, :class:`RemoteEntitlements` over ``ACCESS_ENTITLEMENTS_URL``); build
it with :func:`build_entitlements` and start its ``components`` with the Supervisor. For an unkeyed
subscription, ``Decider.denied_under`` lists the deny globs under a channel and :func:`hidden_keys` turns
them into a per-message-key filter.
"""

from ...errors import InvalidInput as InvalidInput
from ._build import EntitlementsRuntime as EntitlementsRuntime
from ._build import build_entitlements as build_entitlements
from ._build import build_store as build_store
from ._cache import AdaptiveTtl as AdaptiveTtl
from ._cli import add_grants_arguments as add_grants_arguments
from ._cli import run_grants_cli as run_grants_cli
from ._evaluate import GrantIndex as GrantIndex
from ._evaluate import deny_globs_under as deny_globs_under
from ._evaluate import evaluate as evaluate
from ._evaluate import hidden_keys as hidden_keys
from ._evaluate import matches_under as matches_under
from ._evaluate import resource_matches as resource_matches
from ._evaluate import tenant_mismatch as tenant_mismatch
from ._file_store import FileStore as FileStore
from ._file_store import check_policy_file as check_policy_file
from ._model import ACTIONS as ACTIONS
from ._model import ALLOWED as ALLOWED
from ._model import DENIED_BY_GRANT as DENIED_BY_GRANT
from ._model import NO_MATCHING_GRANT as NO_MATCHING_GRANT
from ._model import TENANT_MISMATCH as TENANT_MISMATCH
from ._model import Decision as Decision
from ._model import DecisionInput as DecisionInput
from ._model import Grant as Grant
from ._model import parse_decision_input as parse_decision_input
from ._model import parse_grant as parse_grant
from ._pg_store import PostgresStore as PostgresStore
from ._remote import RemoteEntitlements as RemoteEntitlements
from ._service import Decider as Decider
from ._service import EntitlementMetrics as EntitlementMetrics
from ._service import Entitlements as Entitlements
from ._service import SharedDecisionCache as SharedDecisionCache
from ._store import EmptyStore as EmptyStore
from ._store import GrantStore as GrantStore
from ._version import PolicyVersion as PolicyVersion
