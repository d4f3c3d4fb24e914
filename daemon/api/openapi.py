"""The OpenAPI 3.1 document, generated from the route table and the msgspec wire types."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

import ember
from ember._types import ErrorBody
from ember.daemon.engine.environments import ENV_NAME_PATTERN

if TYPE_CHECKING:
    from ember.daemon.api.routing import RouteSpec

_REF = "#/components/schemas/{name}"
_ERRORS = {
    "400": "A field is invalid; the message names it",
    "401": "Missing or unknown API key (TCP only)",
    "403": "The API key belongs to another environment, or the action needs the Unix socket",
    "404": "No such run, task or version",
    "405": "The path does not accept this method (the Allow header lists those it does)",
    "408": "The request did not arrive in full within request_timeout_s (TCP)",
    "409": "The run's state does not allow this",
    "413": "Body, payload or archive over the limit",
    "431": "Headers over max_header_bytes",
    "503": "Too many TCP connections (max_connections_per_client, max_tcp_connections)",
    "507": "The daemon's disk is full",
}


def openapi_document(routes: Sequence[RouteSpec]) -> dict[str, Any]:
    """Build the document for ``routes``."""
    types: list[Any] = [ErrorBody]
    for route in routes:
        types.extend(t for t in (route.request, route.response) if t is not None)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"{(\w+)(?::\w+)?}", route.path)
            ]
            + [
                {
                    "name": query[0],
                    "in": "query",
                    "description": query[1],
                    "schema": query[2] if len(query) > 2 else {"type": "string"},
                }
                for query in route.query
            ]
            + [
                {
                    "name": "x-ember-env",
                    "in": "header",
                    "description": "environment (Unix socket only; a key decides it over TCP)",
                    "schema": {"type": "string", "default": "dev", "pattern": ENV_NAME_PATTERN},
                }
            ],
            "responses": {
                code: {
                    "description": text,
                    "content": {"application/json": {"schema": refs[ErrorBody]}},
                }
                for code, text in _ERRORS.items()
            },
        }
        if route.response is not None:
            operation["responses"]["200"] = {
                "description": "OK",
                "content": {"application/json": {"schema": refs[route.response]}},
            }
        else:
            operation["responses"]["200"] = {
                "description": "A stream of `data: <RunEvent JSON>` lines",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {route.content_type: {"schema": refs[route.request]}},
            }
        elif route.content_type != "application/json":
            # Bytes are bytes: the daemon reads the body whatever its declared type.
            binary = {"schema": {"type": "string", "format": "binary"}}
            operation["requestBody"] = {
                "required": True,
                "content": {route.content_type: binary, "application/octet-stream": binary},
            }
        path = re.sub(r"{(\w+):\w+}", r"{\1}", route.path)
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ember daemon API", "version": ember.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
