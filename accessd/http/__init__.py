"""REST listeners (Quart-trio apps on our own h11 server), the request pipeline, the uniform error body,
every REST endpoint: auth (edge check, ``/auth/verify``, dev JWKS), entitlements (check, grants), stream
publishing; and the gateway (``ACCESS_ROUTES_FILE`` routes proxied to upstreams). Endpoints are blueprints
built over the policy and stream objects the daemon hands in."""

from ..errors import ApiError as ApiError
from ._app import AppContext as AppContext
from ._app import create_app as create_app
from ._app import edge_blueprints as edge_blueprints
from ._auth import EdgeAuth as EdgeAuth
from ._auth import edge_auth as edge_auth
from ._auth import edge_auth_routes as edge_auth_routes
from ._auth import identity_body as identity_body
from ._auth import internal_auth_routes as internal_auth_routes
from ._auth import require_identity as require_identity
from ._demo import DEMO_BIND as DEMO_BIND
from ._demo import demo_upstream_app as demo_upstream_app
from ._demo import write_demo_routes as write_demo_routes
from ._entitlements import entitlements_blueprint as entitlements_blueprint
from ._errors import error_response as error_response
from ._gateway import Gateway as Gateway
from ._gateway import check_routes_file as check_routes_file
from ._metrics_track import metrics_track as metrics_track
from ._publish import stream_publish as stream_publish
from ._server import HttpListener as HttpListener
