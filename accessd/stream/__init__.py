"""Streaming: Kafka (or the embedded broker) fanned out to WebSocket and SSE subscribers.

Layout: ``_source`` the broker interface and cursors, ``_embedded`` the in-process broker, ``_kafka`` the
aiokafka source, ``_hub`` subscriptions and fan-out, ``_transport`` sockets or any Trio stream, ``_conn`` one
client's connection with direct writes and the slow-consumer policies, ``_session`` what both protocols
share, ``_ws`` and ``_sse`` the protocols of CONTRACT §10, ``_admission`` who may connect, ``_listener`` the
accept loop and routing, ``_metrics`` its metrics, ``_http11`` request heads, ``_frames`` outgoing bytes.
"""

from ._browser import BrowserAccess as BrowserAccess
from ._build import build_stream as build_stream
from ._build import entitlement_authorizer as entitlement_authorizer
from ._cli import add_publish_arguments as add_publish_arguments
from ._cli import run_publish_cli as run_publish_cli
from ._conn import POLICIES as POLICIES
from ._conn import Closed as Closed
from ._embedded import EmbeddedBroker as EmbeddedBroker
from ._frames import compact_json as compact_json
from ._hub import Hub as Hub
from ._listener import StreamListener as StreamListener
from ._report import ChannelReport as ChannelReport
from ._session import MAX_KEY_CHARS as MAX_KEY_CHARS
from ._session import Access as Access
from ._session import Authorize as Authorize
from ._source import Record as Record
from ._source import Source as Source
from ._source import decode_cursor as decode_cursor
from ._source import encode_cursor as encode_cursor
from ._source import is_channel_name as is_channel_name
