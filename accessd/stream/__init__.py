"""Streaming: Kafka (or the embedded broker) fanned out to WebSocket and SSE subscribers.

Layout: ``_source`` the broker interface and cursors, ``_embedded`` the in-process broker, ``_kafka`` the
aiokafka source, ``_hub`` subscriptions and fan-out, ``_conn`` one socket with direct writes and the
slow-consumer policies, ``_sessions`` the WebSocket/SSE protocol, ``_listener`` the accept loop and
admission, ``_http11`` request heads, ``_frames`` outgoing bytes.
"""

from ._build import build_stream as build_stream
from ._build import entitlement_authorizer as entitlement_authorizer
from ._cli import add_publish_arguments as add_publish_arguments
from ._cli import run_publish_cli as run_publish_cli
from ._conn import POLICIES as POLICIES
from ._embedded import EmbeddedBroker as EmbeddedBroker
from ._hub import Hub as Hub
from ._listener import StreamListener as StreamListener
from ._sessions import MAX_KEY_CHARS as MAX_KEY_CHARS
from ._sessions import Access as Access
from ._sessions import Authorize as Authorize
from ._source import CHANNEL_NAME as CHANNEL_NAME
from ._source import Record as Record
from ._source import Source as Source
from ._source import decode_cursor as decode_cursor
from ._source import encode_cursor as encode_cursor
