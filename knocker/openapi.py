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
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def openapi_document(version: str) -> dict[str, Any]:
    status = {
        "type": "object",
        "properties": {"status": {"type": "string"}},
        "required": ["status"],
    }
    verify_responses = {
        "200": {"description": "The caller may pass (empty body)"},
        "401": {"description": "The caller may not pass (empty body)"},
    }
    verify = {"summary": "Auth subrequest for reverse proxies", "responses": verify_responses}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": OPENAPI_TITLE,
            "version": version,
            "description": "Knock-knock gateway: whitelist an IP after an API-key knock.",
        },
        "paths": {
            "/knock": {
                "post": {
                    "summary": "Whitelist the caller (or, for admin keys, an IP/CIDR)",
                    "parameters": [
                        {
                            "name": "X-Api-Key",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/KnockRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Whitelisted",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/KnockResponse"}
                                }
                            },
                        },
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
                "delete": _sign_out_operation(),
                "options": {
                    "summary": "CORS preflight",
                    "responses": {"204": {"description": "CORS headers"}},
                },
            },
            **_grants_paths(),
            # Any method: Traefik's forwardAuth, for one, keeps the original request's.
            "/verify": {
                method: verify
                for method in ("get", "head", "post", "put", "delete", "patch", "options")
            },
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": {
                            "description": "Serving",
                            "content": {"application/json": {"schema": status}},
                        }
                    },
                }
            },
            "/ready": {
                "get": {
                    "summary": "Readiness",
                    "responses": {
                        "200": {
                            "description": "Storage writable and firewall in place",
                            "content": {"application/json": {"schema": status}},
                        },
                        "503": {
                            "description": "Not ready",
                            "content": {"application/json": {"schema": status}},
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document (documentation.enabled)",
                    "responses": {"200": {"description": "OpenAPI 3"}},
                }
            },
            "/docs": {
                "get": {
                    "summary": "Swagger UI for this document (documentation.enabled)",
                    "responses": {
                        "200": {
                            "description": "HTML page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": (
                        "Prometheus metrics (metrics.enabled; metrics.allow or an admin key)"
                    ),
                    "parameters": [
                        {
                            "name": "X-Api-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "Prometheus text format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "403": {"description": "Not an allowed address or admin key"},
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "KnockRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "ip_address": {"type": "string", "maxLength": 100, "nullable": True},
                        "ttl": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_TTL,
                            "nullable": True,
                        },
                    },
                },
                "KnockResponse": {
                    "type": "object",
                    "required": ["whitelisted_entry", "expires_at", "expires_in_seconds"],
                    "properties": {
                        "whitelisted_entry": {"type": "string"},
                        "expires_at": {"type": "integer"},
                        "expires_in_seconds": {"type": "integer"},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                **_grants_schemas(),
            }
        },
    }


# ---------------------------------------------------------------------- grants (docs/api.md#grants)

_API_KEY = {"name": "X-Api-Key", "in": "header", "required": True, "schema": {"type": "string"}}


def _grant_list(member: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": [member],
                    "properties": {
                        member: {"type": "array", "items": {"$ref": "#/components/schemas/Grant"}}
                    },
                }
            }
        },
    }


def _sign_out_operation() -> dict[str, Any]:
    return {
        "summary": "Sign out: end this key's grants of the caller (or of ip_address)",
        "parameters": [_API_KEY],
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/SignOutRequest"}}
            },
        },
        "responses": {
            "200": _grant_list("removed", "The grants that ended"),
            "400": _error("Invalid body or address, or unknown client"),
            "401": _error("Missing or unknown API key"),
            "403": _error("Key may not name other addresses"),
            "404": _error("This key had no live grant of the address"),
            "413": _error(f"Body larger than {MAX_BODY} bytes"),
            "415": _error("Body is not application/json"),
            "429": _error("Too many requests from this client"),
            "500": _error("The grant could not be ended durably"),
        },
    }


def _admin_responses() -> dict[str, Any]:
    return {
        "401": _error("Missing or unknown API key"),
        "403": _error("Key is not an admin key (admin: true)"),
        "429": _error("Too many requests from this client"),
    }


def _grants_paths() -> dict[str, Any]:
    return {
        "/grants": {
            "get": {
                "summary": "Every live grant (admin keys)",
                "parameters": [_API_KEY],
                "responses": {
                    "200": _grant_list("grants", "Every live grant"),
                    **_admin_responses(),
                },
            }
        },
        "/grants/{entry}": {
            "delete": {
                "summary": "End every grant of an entry: memory, disk and firewall (admin keys)",
                "parameters": [
                    _API_KEY,
                    {
                        "name": "entry",
                        "in": "path",
                        "required": True,
                        "description": "An address or CIDR network, URL-encoded (10.0.0.0%2F24)",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _grant_list("removed", "The grants that ended"),
                    "400": _error("Not an address or network"),
                    "404": _error("No live grant of this entry"),
                    "500": _error("The grant could not be ended durably"),
                    **_admin_responses(),
                },
            }
        },
    }


def _grants_schemas() -> dict[str, Any]:
    integer, nullable_int = {"type": "integer"}, {"type": "integer", "nullable": True}
    return {
        "SignOutRequest": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"ip_address": {"type": "string", "maxLength": 100, "nullable": True}},
        },
        "Grant": {
            "type": "object",
            "required": [
                "entry",
                "key_name",
                "expires_at",
                "expires_in_seconds",
                "granted_at",
                "how",
                "scope",
            ],
            "properties": {
                "entry": {"type": "string"},
                "key_name": {
                    "type": "string",
                    "nullable": True,
                    "description": "The granting key's name (never the key)",
                },
                "expires_at": integer,
                "expires_in_seconds": integer,
                "granted_at": nullable_int,
                "how": {"type": "string", "enum": ["knock", "remote", "restored"]},
                "scope": {
                    "type": "object",
                    "nullable": True,
                    "description": "null (an unscoped key), or the key's hosts "
                    "(null: every host) and the grant's monitored "
                    "ports, like 22/tcp (null: every one)",
                    "properties": {
                        "hosts": {"type": "array", "nullable": True, "items": {"type": "string"}},
                        "ports": {"type": "array", "nullable": True, "items": {"type": "string"}},
                    },
                },
            },
        },
    }
