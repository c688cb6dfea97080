"""OTLP/protobuf encoding of finished spans, written straight to the wire format.

The OpenTelemetry SDK's encoder builds a protobuf object for every span,
attribute and value, hashes the resource (a JSON dump) for every span, and
then serializes it all, which costs more than making the span.
:class:`SpanEncoder` writes the same
``ExportTraceServiceRequest`` (``opentelemetry/proto/collector/trace/v1``)
directly as bytes: spans grouped by resource, then by instrumentation scope,
in the order first seen, every field as the SDK sets it. The tests decode
both encodings of the same spans and compare the messages, so a divergence
from the SDK shows up there.

Pure: no I/O, no telemetry of its own.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext

from service.memo import remember

_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_FIXED32 = struct.Struct("<I")
_INT64_MASK = (1 << 64) - 1
#: Span.flags bits: the parent's is_remote is known (always), and it is true.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
#: Entries kept in each of the encoder's memos (attribute names, whole scalar attributes).
_MEMO_SIZE = 4096


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _string_field(tag: bytes, value: str | None) -> bytes:
    """A proto3 string field: omitted when empty, as the SDK's message would omit it."""
    return _len_field(tag, value.encode()) if value else b""


# Tags, by message. Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
_REQUEST_RESOURCE_SPANS = _tag(1, 2)
_RESOURCE_SPANS_RESOURCE, _RESOURCE_SPANS_SCOPE_SPANS, _RESOURCE_SPANS_SCHEMA_URL = _tag(1, 2), _tag(2, 2), _tag(3, 2)
_RESOURCE_ATTRIBUTES = _tag(1, 2)
_SCOPE_SPANS_SCOPE, _SCOPE_SPANS_SPANS, _SCOPE_SPANS_SCHEMA_URL = _tag(1, 2), _tag(2, 2), _tag(3, 2)
_SCOPE_NAME, _SCOPE_VERSION, _SCOPE_ATTRIBUTES = _tag(1, 2), _tag(2, 2), _tag(3, 2)
_SPAN_TRACE_ID = _tag(1, 2) + b"\x10"  # always 16 bytes
_SPAN_SPAN_ID = _tag(2, 2) + b"\x08"  # always 8 bytes
_SPAN_TRACE_STATE = _tag(3, 2)
_SPAN_PARENT_SPAN_ID = _tag(4, 2) + b"\x08"
_SPAN_NAME = _tag(5, 2)
_SPAN_KIND = _tag(6, 0)
_SPAN_START, _SPAN_END = _tag(7, 1), _tag(8, 1)
_SPAN_ATTRIBUTES = _tag(9, 2)
_SPAN_DROPPED_ATTRIBUTES = _tag(10, 0)
_SPAN_EVENTS = _tag(11, 2)
_SPAN_DROPPED_EVENTS = _tag(12, 0)
_SPAN_LINKS = _tag(13, 2)
_SPAN_DROPPED_LINKS = _tag(14, 0)
_SPAN_STATUS = _tag(15, 2)
_SPAN_FLAGS = _tag(16, 5)
_EVENT_TIME, _EVENT_NAME, _EVENT_ATTRIBUTES, _EVENT_DROPPED = _tag(1, 1), _tag(2, 2), _tag(3, 2), _tag(4, 0)
_LINK_TRACE_ID, _LINK_SPAN_ID, _LINK_TRACE_STATE = _tag(1, 2) + b"\x10", _tag(2, 2) + b"\x08", _tag(3, 2)
_LINK_ATTRIBUTES, _LINK_DROPPED, _LINK_FLAGS = _tag(4, 2), _tag(5, 0), _tag(6, 5)
_STATUS_MESSAGE, _STATUS_CODE = _tag(2, 2), _tag(3, 0)
_KEY_VALUE_KEY, _KEY_VALUE_VALUE = _tag(1, 2), _tag(2, 2)
_ANY_STRING, _ANY_BOOL, _ANY_INT, _ANY_DOUBLE = _tag(1, 2), _tag(2, 0), _tag(3, 0), _tag(4, 1)
_ANY_ARRAY, _ANY_KVLIST, _ANY_BYTES = _tag(5, 2), _tag(6, 2), _tag(7, 2)
_LIST_VALUES = _tag(1, 2)  # ArrayValue.values and KeyValueList.values


def _any_value(value: Any) -> bytes:
    """An AnyValue message (its body), as the SDK's ``_encode_value`` builds it."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return _ANY_BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _len_field(_ANY_STRING, value.encode())
    if isinstance(value, int):
        return _ANY_INT + _varint(value & _INT64_MASK)
    if isinstance(value, float):
        return _ANY_DOUBLE + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _len_field(_ANY_BYTES, value)
    if isinstance(value, Sequence):
        return _len_field(_ANY_ARRAY, b"".join(_len_field(_LIST_VALUES, _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        pairs = b"".join(_len_field(_LIST_VALUES, _key_value(str(k), v)) for k, v in value.items())
        return _len_field(_ANY_KVLIST, pairs)
    raise TypeError(f"attribute values of type {type(value).__name__} cannot be encoded")


def _key_value(key: str, value: Any) -> bytes:
    return _len_field(_KEY_VALUE_KEY, key.encode()) + _len_field(_KEY_VALUE_VALUE, _any_value(value))


def _trace_state(context: SpanContext) -> str:
    state = context.trace_state
    return ",".join(f"{key}={value}" for key, value in state.items()) if state is not None else ""


def _flags(parent: SpanContext | None) -> bytes:
    return _FIXED32.pack(_HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE)


class SpanEncoder:
    """Encodes batches of finished spans as an OTLP ``ExportTraceServiceRequest``.

    Keeps bounded memos of encoded attribute names and of whole attributes
    with a string, integer or boolean value: a service's spans repeat the
    same few names, methods, partners and counts. One encoder per exporter;
    not shared across threads.
    """

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._scalars: dict[tuple[str, type, Any], bytes] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialized request carrying ``spans``."""
        groups: dict[int, tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = {}
        for span in spans:
            resource = span.resource
            _, scopes = groups.setdefault(id(resource), (resource, {}))
            scopes.setdefault(span.instrumentation_scope or None, []).append(self._span(span))
        out = []
        for resource, scopes in groups.values():
            body = [_len_field(_RESOURCE_SPANS_RESOURCE, self._resource(resource))]
            for scope, encoded in scopes.items():
                scope_spans = [_len_field(_SCOPE_SPANS_SCOPE, self._scope(scope))]
                scope_spans.extend(_len_field(_SCOPE_SPANS_SPANS, span) for span in encoded)
                scope_spans.append(_string_field(_SCOPE_SPANS_SCHEMA_URL, scope.schema_url if scope else None))
                body.append(_len_field(_RESOURCE_SPANS_SCOPE_SPANS, b"".join(scope_spans)))
            body.append(_string_field(_RESOURCE_SPANS_SCHEMA_URL, resource.schema_url))
            out.append(_len_field(_REQUEST_RESOURCE_SPANS, b"".join(body)))
        return b"".join(out)

    def _span(self, span: ReadableSpan) -> bytes:
        context = span.get_span_context()
        assert context is not None, "a finished span always has its context"
        parent = span.parent
        status = span.status
        status_body = _string_field(_STATUS_MESSAGE, status.description) + (
            _STATUS_CODE + _varint(status.status_code.value) if status.status_code.value else b""
        )
        parts = [
            _SPAN_TRACE_ID,
            context.trace_id.to_bytes(16, "big"),
            _SPAN_SPAN_ID,
            context.span_id.to_bytes(8, "big"),
            _string_field(_SPAN_TRACE_STATE, _trace_state(context)),
            _SPAN_PARENT_SPAN_ID + parent.span_id.to_bytes(8, "big") if parent else b"",
            _string_field(_SPAN_NAME, span.name),
            _SPAN_KIND,
            _varint(span.kind.value + 1),  # the SDK's SpanKind counts from INTERNAL = 0, OTLP's from 1
            _SPAN_START + _FIXED64.pack(span.start_time) if span.start_time else b"",
            _SPAN_END + _FIXED64.pack(span.end_time) if span.end_time else b"",
            self._attributes(_SPAN_ATTRIBUTES, span.attributes),
            _SPAN_DROPPED_ATTRIBUTES + _varint(span.dropped_attributes) if span.dropped_attributes else b"",
        ]
        for event in span.events:
            event_body = (
                (_EVENT_TIME + _FIXED64.pack(event.timestamp) if event.timestamp else b"")
                + _string_field(_EVENT_NAME, event.name)
                + self._attributes(_EVENT_ATTRIBUTES, event.attributes)
                + (_EVENT_DROPPED + _varint(event.dropped_attributes) if event.dropped_attributes else b"")
            )
            parts.append(_len_field(_SPAN_EVENTS, event_body))
        if span.dropped_events:
            parts.append(_SPAN_DROPPED_EVENTS + _varint(span.dropped_events))
        parts.extend(_len_field(_SPAN_LINKS, self._link(link)) for link in span.links)
        if span.dropped_links:
            parts.append(_SPAN_DROPPED_LINKS + _varint(span.dropped_links))
        parts += [_len_field(_SPAN_STATUS, status_body), _SPAN_FLAGS, _flags(parent)]
        return b"".join(parts)

    def _link(self, link: Link) -> bytes:
        return (
            _LINK_TRACE_ID
            + link.context.trace_id.to_bytes(16, "big")
            + _LINK_SPAN_ID
            + link.context.span_id.to_bytes(8, "big")
            + self._attributes(_LINK_ATTRIBUTES, link.attributes)
            + (_LINK_DROPPED + _varint(link.dropped_attributes) if link.dropped_attributes else b"")
            + _LINK_FLAGS
            + _flags(link.context)
        )

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        encoded = []
        for key, value in attributes.items():
            try:
                encoded.append(_len_field(tag, self._attribute(key, value)))
            except TypeError:
                continue  # as the SDK's encoder does: the attribute is left out, the span kept
        return b"".join(encoded)

    def _attribute(self, key: str, value: Any) -> bytes:
        kind = type(value)
        if kind is str or kind is int or kind is bool:  # the type is part of the key: True == 1
            known = self._scalars.get((key, kind, value))
            if known is not None:
                return known
            encoded = self._key(key) + _len_field(_KEY_VALUE_VALUE, _any_value(value))
            return remember(self._scalars, (key, kind, value), encoded, _MEMO_SIZE)
        return self._key(key) + _len_field(_KEY_VALUE_VALUE, _any_value(value))

    def _key(self, key: str) -> bytes:
        known = self._keys.get(key)
        if known is not None:
            return known
        return remember(self._keys, key, _len_field(_KEY_VALUE_KEY, key.encode()), _MEMO_SIZE)

    def _resource(self, resource: Resource) -> bytes:
        cached = self._resources.get(id(resource))
        if cached is not None and cached[0] is resource:
            return cached[1]
        encoded = self._attributes(_RESOURCE_ATTRIBUTES, resource.attributes)
        return remember(self._resources, id(resource), (resource, encoded), 16)[1]

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        if scope is None:
            return b""
        return (
            _string_field(_SCOPE_NAME, scope.name)
            + _string_field(_SCOPE_VERSION, scope.version)
            + self._attributes(_SCOPE_ATTRIBUTES, scope.attributes)
        )
