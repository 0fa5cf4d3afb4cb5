"""REST listeners (Quart-trio on Hypercorn), the request pipeline and the uniform error body."""

from ._app import AppContext as AppContext
from ._app import create_app as create_app
from ._errors import ApiError as ApiError
from ._errors import error_response as error_response
from ._server import HttpListener as HttpListener
