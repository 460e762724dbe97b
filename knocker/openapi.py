"""The OpenAPI 3 description of Knocker's HTTP API (served when documentation.enabled).

Owns: the machine-readable form of docs/api.md; tests/test_openapi.py asks the app for
every documented path and method, and checks that every route the app serves is here.
"""

from __future__ import annotations

from typing import Any

from .config import MAX_TTL
from .policy import MAX_BODY

OPENAPI_TITLE = "Knocker"  # also how a stale schema file is recognised as ours


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(version: str) -> dict[str, Any]:
    status = {"type": "object", "properties": {"status": {"type": "string"}},
              "required": ["status"]}
    verify_responses = {"200": {"description": "The caller may pass (empty body)"},
                        "401": {"description": "The caller may not pass (empty body)"}}
    verify = {"summary": "Auth subrequest for reverse proxies", "responses": verify_responses}
    return {
        "openapi": "3.0.3",
        "info": {"title": OPENAPI_TITLE, "version": version,
                 "description": "Knock-knock gateway: whitelist an IP after an API-key knock."},
        "paths": {
            "/knock": {
                "post": {
                    "summary": "Whitelist the caller (or, for admin keys, an IP/CIDR)",
                    "parameters": [{"name": "X-Api-Key", "in": "header", "required": True,
                                    "schema": {"type": "string"}}],
                    "requestBody": {"required": False, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/KnockRequest"}}}},
                    "responses": {
                        "200": {"description": "Whitelisted", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/KnockResponse"}}}},
                        "400": _error("Invalid body, address or TTL, or unknown client"),
                        "401": _error("Missing or unknown API key"),
                        "403": _error("Key may not whitelist other addresses"),
                        "413": _error(f"Body larger than {MAX_BODY} bytes"),
                        "415": _error("Body is not application/json"),
                        "429": _error("Too many knocks from this client"),
                        "500": _error("Nothing was granted"),
                        "503": _error("Firewall unavailable; nothing was granted"),
                    },
                },
                "options": {"summary": "CORS preflight",
                            "responses": {"204": {"description": "CORS headers"}}},
            },
            # Any method: Traefik's forwardAuth, for one, keeps the original request's.
            "/verify": {method: verify for method in (
                "get", "head", "post", "put", "delete", "patch", "options")},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {
                "description": "Serving", "content": {"application/json": {"schema": status}}}}}},
            "/ready": {"get": {"summary": "Readiness", "responses": {
                "200": {"description": "Storage writable and firewall in place",
                        "content": {"application/json": {"schema": status}}},
                "503": {"description": "Not ready",
                        "content": {"application/json": {"schema": status}}}}}},
            "/openapi.json": {"get": {"summary": "This document (documentation.enabled)",
                                      "responses": {"200": {"description": "OpenAPI 3"}}}},
            "/docs": {"get": {"summary": "Swagger UI for this document (documentation.enabled)",
                              "responses": {"200": {"description": "HTML page", "content": {
                                  "text/html": {"schema": {"type": "string"}}}}}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (metrics.enabled; metrics.allow or an admin key)",
                "parameters": [{"name": "X-Api-Key", "in": "header", "required": False,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "Prometheus text format 0.0.4", "content": {
                        "text/plain": {"schema": {"type": "string"}}}},
                    "403": {"description": "Not an allowed address or admin key"}}}},
        },
        "components": {"schemas": {
            "KnockRequest": {"type": "object", "additionalProperties": False, "properties": {
                "ip_address": {"type": "string", "maxLength": 100, "nullable": True},
                "ttl": {"type": "integer", "minimum": 1, "maximum": MAX_TTL,
                        "nullable": True}}},
            "KnockResponse": {"type": "object", "required": [
                "whitelisted_entry", "expires_at", "expires_in_seconds"], "properties": {
                "whitelisted_entry": {"type": "string"},
                "expires_at": {"type": "integer"},
                "expires_in_seconds": {"type": "integer"}}},
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}}},
        }},
    }
