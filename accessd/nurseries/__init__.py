"""The task tree: supervision with restart and backoff, health state, dependency probes, listening sockets.

Backoff and the dependency states themselves live in :mod:`accessd.primitives`, for every layer to use.
"""

from ._health import Health as Health
from ._health import Phase as Phase
from ._probes import DependencyProbes as DependencyProbes
from ._probes import build_probes as build_probes
from ._sockets import accept_each as accept_each
from ._sockets import listen as listen
from ._sockets import receive_when_ready as receive_when_ready
from ._sockets import url_of as url_of
from ._sockets import write_some as write_some
from ._supervisor import Component as Component
from ._supervisor import Runtime as Runtime
from ._supervisor import Supervisor as Supervisor
