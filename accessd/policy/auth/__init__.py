"""Auth: JWT verification against JWKS key sets, the dev issuer, ``/auth/verify``, edge enforcement.

The face other packages use: ``Authenticator.verify(token) -> Identity | AuthFailure`` (handed around as a
callable) and :func:`build_auth` (an :class:`AuthRuntime`) for the daemon; the HTTP endpoints live in
``accessd.http``. Layout: ``_verify`` pure header/signature/claim rules (pyjwt), ``_cache`` verified tokens,
``_jwks`` the key-set component, ``_dev_issuer`` the embedded issuer, ``_remote`` ``ACCESS_AUTH_URL``
delegation, ``_authenticator`` the facade and its wiring.
"""

from .._identity import AuthFailure as AuthFailure
from .._identity import Identity as Identity
from .._identity import Verify as Verify
from ._authenticator import Authenticator as Authenticator
from ._authenticator import AuthRuntime as AuthRuntime
from ._authenticator import LocalVerifier as LocalVerifier
from ._authenticator import build_auth as build_auth
from ._cache import VerifiedTokenCache as VerifiedTokenCache
from ._dev_issuer import MAX_TOKEN_TTL_S as MAX_TOKEN_TTL_S
from ._dev_issuer import DevIssuer as DevIssuer
from ._jwks import JwksCache as JwksCache
from ._jwks import JwksHealth as JwksHealth
from ._jwks import StaticKeys as StaticKeys
from ._metrics import AuthMetrics as AuthMetrics
from ._remote import RemoteVerifier as RemoteVerifier
from ._verify import ALLOWED_ALGORITHMS as ALLOWED_ALGORITHMS
from ._verify import TOKEN_EXPIRED as TOKEN_EXPIRED
from ._verify import TOKEN_INVALID as TOKEN_INVALID
from ._verify import UNAUTHENTICATED as UNAUTHENTICATED
from ._verify import ClaimPolicy as ClaimPolicy
from ._verify import VerificationKey as VerificationKey
from ._verify import parse_jwks as parse_jwks
