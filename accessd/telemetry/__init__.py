"""Prometheus registry, JSON logging, request and trace ids, OpenTelemetry tracing.

Layout: ``_metrics`` the registry, ``_logging`` JSON log lines, ``_ids`` the ids a request carries (trace id,
request id), ``_tracing`` spans exported over OTLP (``_otlp`` encodes them).
"""

from ._custom import CustomMetrics as CustomMetrics
from ._custom import Rejected as Rejected
from ._ids import request_id_from as request_id_from
from ._ids import trace_id_from as trace_id_from
from ._ids import traceparent_from as traceparent_from
from ._ingest import Ingest as Ingest
from ._ingest import IngestMetrics as IngestMetrics
from ._ingest import MetricsFlusher as MetricsFlusher
from ._ingest import MetricsForwarder as MetricsForwarder
from ._ingest import Overloaded as Overloaded
from ._logging import configure_logging as configure_logging
from ._logging import conn_id_var as conn_id_var
from ._logging import req_id_var as req_id_var
from ._logging import trace_id_var as trace_id_var
from ._metrics import CONTENT_TYPE as CONTENT_TYPE
from ._metrics import LATENCY_BUCKETS as LATENCY_BUCKETS
from ._metrics import Metrics as Metrics
from ._tracing import ActiveSpan as ActiveSpan
from ._tracing import Span as Span
from ._tracing import Tracing as Tracing
from ._tracing import active_span_var as active_span_var
from ._tracing import outbound_traceparent as outbound_traceparent
from ._tracing import traceparent_var as traceparent_var
