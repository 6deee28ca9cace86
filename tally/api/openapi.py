"""The OpenAPI document and its /docs page, made from the route table and the msgspec structs
that the routes decode and encode: what is documented is what is validated.

What a struct cannot say is added from the settings: the configured counters (toggle or event,
where the route takes one kind), item types and limits become enums, maxItems and bounds, so a
request the document calls valid is one the service accepts (Schemathesis checks both ways in
tests/api/test_schemathesis.py). Every refusal the API can answer is listed with its status.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import msgspec

import tally
from tally.api import schemas as s
from tally.api.http import Route
from tally.core.model import INT64_MAX, INT64_MIN, MAX_INCR
from tally.settings import Settings

_REF = "#/components/schemas/{name}"
_DESCRIPTION = """Durable, idempotent like counts and other counters.

Authentication: `Authorization: Bearer <credential>`. Client routes take an API key (from the
server's `api_keys_file`) or the admin token; admin routes (`/v1/admin/*`, `/metrics`) the admin
token only. A server with no credential of a kind configured serves those routes to loopback
clients only, without one. The user ids in requests are asserted by the calling backend.

Limits: per user and per API key token buckets (429 with `Retry-After`); headers and body must
arrive within 10 s (408); bodies over the configured size get 413."""
ID_PATTERN = "^[A-Za-z0-9_.:-]{1,64}$"
_ID = {"anyOf": [{"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
                 {"type": "string", "pattern": ID_PATTERN}],
       "description": "An int64, or a string id of 1-64 characters [A-Za-z0-9_.:-]"}
_REGION = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 32}, {"type": "null"}],
           "default": None, "description": "Region for rollups; defaults to the server's"}

_ERRORS = {
    "400": "The body is not JSON (a byte order mark included)",
    "401": "No credential, or an unknown one, where the route needs one",
    "403": "An API key outside its scope, or a client off loopback where no credential is "
           "configured",
    "404": "No such path",
    "408": "The headers or the body did not arrive in time",
    "413": "The body is over max_body_bytes",
    "422": "The body or a parameter is well-formed JSON of the wrong shape, or names an unknown "
           "counter or item type, or is over a limit (max_batch_items, max_bulk_ops)",
    "429": "Over a rate limit (per user or per API key)",
    "503": "A store could not take the request; retry (writes are idempotent)",
}
_HEADERS = {
    "401": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
    "429": {"Retry-After": {"description": "Seconds until the bucket holds a token again",
                            "schema": {"type": "integer", "minimum": 1}}},
}


def _error(status: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": _ERRORS[status], "content": {"application/json": {
        "schema": {"$ref": _REF.format(name="ErrorResponse")}}}}
    if status in _HEADERS:
        answer["headers"] = _HEADERS[status]
    return answer


def _statuses(r: Route) -> list[str]:
    found = ["422", "503"]
    if r.body is not None:
        found += ["400", "408", "413"]
    if r.access != "public":
        found += ["401", "403", "429"]
    if "{" in r.path:
        found.append("404")
    return sorted(found)


class _Vocabulary:
    """The enums of one server: its counters by kind, its item types."""

    def __init__(self, settings: Settings) -> None:
        defs = settings.counter_defs().values()
        self.counters = [c.name for c in defs]
        self.toggles = [c.name for c in defs if c.kind == "toggle"]
        self.events = [c.name for c in defs if c.kind == "event"]
        self.item_types = list(settings.item_types)
        self.max_items, self.max_ops = settings.max_batch_items, settings.max_bulk_ops

    def enum(self, names: list[str]) -> dict[str, Any]:
        return {"type": "string", "enum": names}

    def path_param(self, route: Route, name: str) -> dict[str, Any]:
        if name == "counter":
            kinds = {"/incr": self.events, "/set": self.toggles, "/clear": self.toggles}
            chosen = next((v for k, v in kinds.items() if route.path.endswith(k)), None)
            if route.path.startswith("/v1/has/"):
                chosen = self.toggles
            return self.enum(chosen if chosen is not None else self.counters)
        if name == "item_type":
            return self.enum(self.item_types)
        if name == "dimension":
            return self.enum(["day", "region"])
        return {"type": "string", "pattern": ID_PATTERN}

    def refine(self, components: dict[str, Any]) -> None:
        """Enums, bounds and id schemas on the structs' JSON schemas, in place."""
        for schema in components.values():
            props = schema.get("properties", {})
            for name, prop in props.items():
                if name in ("item_id", "user_id"):
                    nullable = "null" in str(prop.get("anyOf", ""))
                    props[name] = {**_ID, "anyOf": [*_ID["anyOf"], {"type": "null"}]} \
                        if nullable else dict(_ID)
                elif name == "item_type":
                    props[name] = self.enum(self.item_types)
                elif name == "region":
                    props[name] = dict(_REGION)
            if "n" in props:
                props["n"] = {"type": "integer", "minimum": 1, "maximum": MAX_INCR, "default": 1}
            if "idempotency_key" in props:
                props["idempotency_key"] = {
                    "anyOf": [{"type": "string", "minLength": 1, "maxLength": 128},
                              {"type": "null"}], "default": None,
                    "description": props["idempotency_key"].get("description", "")}
        item_ref = {"$ref": _REF.format(name="ItemRef")}
        for name in ("CountsRequest", "HasRequest"):
            components[name]["properties"]["items"] = {
                "type": "array", "items": item_ref, "maxItems": self.max_items}
        components["ReconcileRequest"]["properties"]["items"] = {
            "anyOf": [{"type": "array", "items": item_ref, "minItems": 1,
                       "maxItems": self.max_items}, {"type": "null"}],
            "default": None, "description": "Default: every item"}
        components["CountsRequest"]["properties"]["counters"] = {
            "anyOf": [{"type": "array", "items": self.enum(self.counters)}, {"type": "null"}],
            "default": None, "description": "Default: every counter"}
        components["HasRequest"]["properties"]["counter"] = {**self.enum(self.toggles),
                                                             "default": "like"}
        components["BulkRequest"]["properties"]["ops"] = {
            "type": "array", "minItems": 1, "maxItems": self.max_ops,
            "items": {"oneOf": [self._toggle_op(), self._incr_op()]},
            "description": "Checked whole before any is written: all or nothing"}

    def _toggle_op(self) -> dict[str, Any]:
        return {"type": "object", "required": ["op", "item_type", "item_id", "user_id"],
                "properties": {"op": self.enum(["set", "clear", "like", "unlike"]),
                               "counter": {**self.enum(self.toggles), "default": "like"},
                               "item_type": self.enum(self.item_types), "item_id": _ID,
                               "user_id": _ID, "region": _REGION}}

    def _incr_op(self) -> dict[str, Any]:
        return {"type": "object", "required": ["op", "counter", "item_type", "item_id"],
                "properties": {"op": self.enum(["incr"]), "counter": self.enum(self.events),
                               "item_type": self.enum(self.item_types), "item_id": _ID,
                               "n": {"type": "integer", "minimum": 1, "maximum": MAX_INCR},
                               "idempotency_key": {"anyOf": [
                                   {"type": "string", "minLength": 1, "maxLength": 128},
                                   {"type": "null"}]},
                               "user_id": {"anyOf": [*_ID["anyOf"], {"type": "null"}]},
                               "region": _REGION}}


def openapi(routes: Sequence[Route], settings: Settings) -> dict[str, Any]:
    kinds = sorted({t for r in routes for t in (r.body, r.answer) if t is not None}
                   | {s.ErrorResponse, s.ItemRef}, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(kinds, ref_template=_REF)
    ref = dict(zip(kinds, refs, strict=True))
    vocab = _Vocabulary(settings)
    vocab.refine(components)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, ref, vocab)
    return {"openapi": "3.1.0",
            "info": {"title": "Tally", "version": tally.__version__, "description": _DESCRIPTION},
            "paths": paths,
            "components": {"schemas": components, "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "An API key, or the admin token"}}}}


def _operation(r: Route, ref: dict[type, Any], vocab: _Vocabulary) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": r.summary, "tags": list(r.tags),
                          "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_')}"
                          .replace("{", "").replace("}", ""),
                          "security": [] if r.access == "public" else [{"bearer": []}]}
    params = [{"name": seg[1:-1], "in": "path", "required": True,
               "schema": vocab.path_param(r, seg[1:-1])}
              for seg in r.segments if seg.startswith("{")]
    params += [{"name": name, "in": "query", "required": False,
                "schema": {"type": "array", "items": vocab.enum(vocab.counters)}
                if name == "counter" else schema}
               for name, schema in r.query]
    if params:
        op["parameters"] = params
    if r.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": ref[r.body]}}}
    if r.media_type == "application/x-ndjson" and r.answer is not None:
        ok = {"description": "NDJSON progress: one JSON object a line (x-item-schema), the "
                             "last with done: true", "content": {r.media_type: {
                                 "schema": {"type": "string"}, "x-item-schema": ref[r.answer]}}}
    elif r.answer is not None:
        ok = {"description": "OK", "content": {r.media_type: {"schema": ref[r.answer]}}}
    else:
        ok = {"description": "Prometheus text exposition format 0.0.4",
              "content": {r.media_type: {"schema": {"type": "string"}}}}
    op["responses"] = {"200": ok, **{code: _error(code) for code in _statuses(r)}}
    return op


# Swagger UI, shipped with Tally (the swagger-ui-bundle-v2 package): /docs works with no internet.
SWAGGER_DIR = files("swagger_ui_bundle") / "vendor" / "swagger-ui-5.31.0"
DOCS_ASSETS = {"swagger-ui.css": b"text/css; charset=utf-8",
               "swagger-ui-bundle.js": b"text/javascript; charset=utf-8"}


def docs_asset(name: str) -> bytes:
    return (SWAGGER_DIR / name).read_bytes()


def docs_html(openapi_url: str = "/openapi.json") -> bytes:
    return f"""<!doctype html>
<html><head><title>Tally - Swagger UI</title><meta charset="utf-8">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "{openapi_url}", dom_id: "#swagger-ui"}})</script>
</body></html>
""".encode()
