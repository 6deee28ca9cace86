"""The OpenAPI document and its /docs page, made from the route table and the msgspec structs
that the routes decode and encode: what is documented is what is validated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

import tally
from tally.api import schemas as s
from tally.api.http import Route

_REF = "#/components/schemas/{name}"
_DESCRIPTION = "Durable, idempotent like counts and other counters."


def openapi(routes: Sequence[Route]) -> dict[str, Any]:
    kinds = sorted({t for r in routes for t in (r.body, r.answer) if t is not None} | {s.ErrorResponse},
                   key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(kinds, ref_template=_REF)
    ref = dict(zip(kinds, refs, strict=True))
    error = {"description": "Error: code, message and the field at fault",
             "content": {"application/json": {"schema": ref[s.ErrorResponse]}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "tags": list(r.tags),
                              "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_')}"
                              .replace("{", "").replace("}", "")}
        params = [{"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
                  for seg in r.segments if seg.startswith("{")]
        params += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in r.query]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": ref[r.body]}}}
        answer = {"schema": ref[r.answer]} if r.answer is not None else {"schema": {"type": "string"}}
        op["responses"] = {"200": {"description": "OK", "content": {r.media_type: answer}},
                           "4XX": error, "503": error}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "Tally", "version": tally.__version__, "description": _DESCRIPTION},
            "paths": paths, "components": {"schemas": components}}


def docs_html(openapi_url: str = "/openapi.json") -> bytes:
    """Swagger UI, loaded from its CDN like FastAPI's own /docs page."""
    return f"""<!doctype html>
<html><head><title>Tally - Swagger UI</title><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{url: "{openapi_url}", dom_id: "#swagger-ui"}})</script>
</body></html>
""".encode()
