"""Traces, with the optional extra ``mention-indexer[otel]``: a span per batch, linked to the trace
each message carries in ``VtEvent.trace.trace_context``, so a producer's trace shows where its
change was applied.

Opt-in by the standard variables: ``OTEL_TRACES_EXPORTER`` (``console``, ``otlp`` or both,
comma-separated; unset or ``none``: no tracing), ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.
Unlike the OpenTelemetry default (``otlp``), an unset exporter means off: a sidecar should not
start sending traces somewhere because a library was installed.  Contexts are read in the W3C
form (``traceparent``) and the OpenTracing/Jaeger one (``uber-trace-id``), with no configuration.

Without the extra, or unconfigured, every function here is a no-op that costs a branch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

_tracer: Any = None
_propagator: Any = None


def configure() -> bool:
    """Set tracing up from the environment; whether it is on."""
    global _tracer, _propagator
    exporters = [name.strip() for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    exporters = [name for name in exporters if name != "none"]
    if not exporters:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.propagators.jaeger import JaegerPropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        log.warning(
            "OTEL_TRACES_EXPORTER is set but the otel extra is not installed: pip install 'mention-indexer[otel]'"
        )
        return False
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "mention-indexer")})
    )
    for name in exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored (console and otlp are known)", name)
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("mention-indexer")
    _propagator = CompositePropagator([TraceContextTextMapPropagator(), JaegerPropagator()])
    log.info("tracing on, exporting to %s", ", ".join(exporters))
    return True


def shutdown() -> None:
    """Flush what is buffered (at exit)."""
    if _tracer is not None:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span around the block (a child of the current one); nothing without tracing."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def link(current: Any, carriers: Iterable[Mapping[str, str]]) -> None:
    """Link ``current`` (a span from ``span``) to the context each carrier holds, if any."""
    if current is None or _propagator is None:
        return
    from opentelemetry import trace

    for carrier in carriers:
        if not carrier:
            continue
        context = trace.get_current_span(_propagator.extract(carrier)).get_span_context()
        if context.is_valid:
            current.add_link(context)


def inject() -> dict[str, str]:
    """The current context as a carrier for ``VtEvent.trace.trace_context`` (empty without tracing)."""
    carrier: dict[str, str] = {}
    if _propagator is not None:
        _propagator.inject(carrier)
    return carrier
