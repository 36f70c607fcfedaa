"""OpenAPI request bodies of the routes that read their body themselves (multipart or JSON
session creation, raw audio, SDP offers). FastAPI cannot infer these, so
they are declared here: clients and the schemathesis test (tests/test_schema.py) see what
each route takes."""

from __future__ import annotations


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` inlined (OpenAPI resolves refs from the
    document root, so `#/$defs/...` would dangle)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.rsplit("/", 1)[1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(schema)


def _body(content: dict, required: bool = True) -> dict:
    return {"requestBody": {"required": required, "content": content}}


def create_body(options_model, offer_model) -> dict:
    offer = {"anyOf": [{"type": "string", "description": "SDP"}, _inline(offer_model.model_json_schema())]}
    return _body({
        "application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "properties": {"avatar": {"type": "string", "description": "a bundled avatar's name"},
                           "options": _inline(options_model.model_json_schema()),
                           "offer": offer}}},
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {"image": {"type": "string", "format": "binary", "description": "portrait (PNG/JPEG)"},
                           "avatar": {"type": "string"},
                           "options": {"type": "string", "description": "JSON: the options object"},
                           "offer": {"type": "string", "description": "SDP, or JSON {sdp, type}"}}}},
    })


def offer_body(offer_model) -> dict:
    return _body({"application/sdp": {"schema": {"type": "string"}},
                  "application/json": {"schema": _inline(offer_model.model_json_schema())}})


AUDIO = _body({"audio/pcm": {"schema": {"type": "string", "format": "binary",
                                        "description": "PCM16 little-endian mono at `rate` Hz"}},
               "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
               "audio/wav": {"schema": {"type": "string", "format": "binary"}}})
