"""What the OpenAPI document says the API routes take and answer, amended from BentoML's."""

from __future__ import annotations

import json

from serving.lineage import HEADERS as LINEAGE_HEADERS

ERROR_SCHEMA = {"type": "object", "title": "Error", "required": ["error"], "additionalProperties": False,
                "properties": {"error": {"type": "string", "description": "What was wrong and what to do"}}}
ERROR_STATUSES = {
    400: "Invalid input: not a readable image, a missing, unknown or text form field, too many files",
    413: "Request body over the size limit (CIFAR10_MAX_BODY_BYTES)",
    429: "More requests in flight than the limit (CIFAR10_MAX_CONCURRENCY); retry later",
    500: "Unexpected server error; the server log has the details",
    503: "Overloaded: the request waited too long for the model (CIFAR10_MAX_LATENCY_MS); retry later",
}
# What a file part holds (OpenAPI encoding.contentType); the decoder goes by the bytes, not the part's type.
IMAGE_TYPES = "image/png, image/jpeg, image/bmp, image/gif, image/webp"
# BentoML's error components: dropped once no operation refers to them.
BENTOML_ERRORS = ("InvalidArgument", "NotFound", "InternalServerError")


def amend_spec(spec: dict, fields: dict[str, set[str]], description: str | None = None) -> dict:
    """``spec`` (BentoML's OpenAPI document) saying what the routes in ``fields`` really take and answer.

    - Errors: :data:`ERROR_SCHEMA` for every status in :data:`ERROR_STATUSES` a route can
      answer, 503 only where the model runs (routes with file fields). BentoML's 404 goes:
      an existing route never answers it.
    - A route with file fields needs a multipart body with no other fields (the guard
      refuses unknown ones), and its file parts are images (:data:`IMAGE_TYPES`).
    - A route with file fields runs the model, and its 200 answers carry the lineage headers
      (:data:`serving.lineage.HEADERS`); BentoML's spec lists no response headers.
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
                responses["200"]["headers"] = {name: {"description": what, "schema": {"type": "string"}}
                                               for name, what in LINEAGE_HEADERS.items()}
            for status, what in ERROR_STATUSES.items():
                if status != 503 or allowed:
                    responses[str(status)] = {"description": what, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            operation["responses"] = responses
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    referenced = json.dumps(spec.get("paths", {}))
    for name in BENTOML_ERRORS:
        if f'"#/components/schemas/{name}"' not in referenced:
            schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    if description is not None:
        spec.setdefault("info", {})["description"] = description
    return spec
