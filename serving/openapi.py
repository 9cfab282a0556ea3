"""What the OpenAPI document says the API routes take and answer, amended from BentoML's."""

from __future__ import annotations

import json

from serving.lineage import ANSWER_HEADERS, HEADERS as LINEAGE_HEADERS

ERROR_SCHEMA = {"type": "object", "title": "Error", "required": ["error"], "additionalProperties": False,
                "properties": {"error": {"type": "string", "description": "What was wrong and what to do"}}}
ERROR_STATUSES = {
    400: "Invalid input: not a PNG, JPEG, BMP, GIF or WebP image, over the pixel limits, a missing, unknown or "
         "text form field, too many files",
    401: "Missing or wrong bearer token (the server requires CIFAR10_API_TOKEN)",
    408: "The request body did not arrive in time; send it at once",
    413: "Request body over the size limit (CIFAR10_MAX_BODY_BYTES)",
    429: "More requests being answered than the limit (CIFAR10_MAX_CONCURRENCY); retry later",
    500: "Unexpected server error; the server log has the details",
    503: "Overloaded: the request waited too long for the model (CIFAR10_MAX_LATENCY_MS), or too many uploads are "
         "arriving at once; retry later",
}
# How a client authenticates where the server has a token (OpenAPI security scheme; Swagger's "Authorize").
BEARER = {"type": "http", "scheme": "bearer",
          "description": "The server's CIFAR10_API_TOKEN; prediction, metadata and metrics routes require it"}
# What a file part holds (OpenAPI encoding.contentType); the decoder goes by the bytes, not the part's type.
IMAGE_TYPES = "image/png, image/jpeg, image/bmp, image/gif, image/webp"
# BentoML's error components: dropped once no operation refers to them.
BENTOML_ERRORS = ("InvalidArgument", "NotFound", "InternalServerError")


def amend_spec(spec: dict, fields: dict[str, dict[str, int]], description: str | None = None,
               token: bool = False) -> dict:
    """``spec`` (BentoML's OpenAPI document) saying what the routes in ``fields`` really take and answer.

    - Errors: :data:`ERROR_SCHEMA` for every status in :data:`ERROR_STATUSES` a route can
      answer, 401 only where the server has a token (then the routes also name the
      :data:`BEARER` scheme). BentoML's 404 goes: an existing route never answers it.
    - A route with file fields needs a multipart body with no other fields (the guard
      refuses unknown ones), and its file parts are images (:data:`IMAGE_TYPES`).
    - A route with file fields runs the model, and its 200 answers carry the lineage headers
      (:data:`serving.lineage.HEADERS`), a one-image route's also its answer
      (:data:`serving.lineage.ANSWER_HEADERS`); BentoML's spec lists no response headers.
    """
    for path, allowed in fields.items():
        for operation in spec.get("paths", {}).get(path, {}).values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if allowed and form:
                operation["requestBody"]["required"] = True
                form.setdefault("schema", {})["additionalProperties"] = False
                form.setdefault("encoding", {}).update({name: {"contentType": IMAGE_TYPES} for name in sorted(allowed)})
            responses = {code: answer for code, answer in operation.get("responses", {}).items()
                         if int(code) < 400}
            if allowed and "200" in responses:
                named = {**LINEAGE_HEADERS, **(ANSWER_HEADERS if "file" in allowed else {})}
                responses["200"]["headers"] = {name: {"description": what, "schema": {"type": "string"}}
                                               for name, what in named.items()}
            for status, what in ERROR_STATUSES.items():
                if status != 401 or token:
                    responses[str(status)] = {"description": what, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            operation["responses"] = responses
            if token:
                operation["security"] = [{"bearerAuth": []}]
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    referenced = json.dumps(spec.get("paths", {}))
    for name in BENTOML_ERRORS:
        if f'"#/components/schemas/{name}"' not in referenced:
            schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    if token:
        spec["components"].setdefault("securitySchemes", {})["bearerAuth"] = BEARER
    if description is not None:
        spec.setdefault("info", {})["description"] = description
    return spec
