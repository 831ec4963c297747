"""Helpers for mesh tests: a small valid mesh as Python data, rendered to YAML and parsed."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from legation.config import Mesh, parse_mesh

BASE: dict[str, Any] = {
    "gateway": {"port": 8080, "admin_port": 19000},
    "services": [
        {
            "name": "reviews",
            "port": 9080,
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
            "endpoints": [
                {
                    "port": 9111,
                    "labels": {"version": "v1"},
                    "sidecar": {"inbound_port": 15111, "outbound_port": 15211, "admin_port": 19011},
                },
                {
                    "port": 9112,
                    "labels": {"version": "v2"},
                    "sidecar": {"inbound_port": 15112, "outbound_port": 15212, "admin_port": 19012},
                },
            ],
        },
        {"name": "ratings", "port": 9080, "endpoints": [{"port": 9121}]},
    ],
    "routes": [
        {"name": "reviews", "match": {"path": {"prefix": "/"}}, "to": {"service": "reviews"}}
    ],
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def parse(data: dict[str, Any], source: str = "mesh.yaml") -> Mesh:
    return parse_mesh(yaml.safe_dump(data, sort_keys=False), source=source)
