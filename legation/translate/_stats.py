"""Envoy's own stats, as the control plane shapes them: tags, and which routes get stats.

Envoy extracts its default tags (``envoy_cluster_name`` from ``cluster.<name>.``,
``envoy_http_conn_manager_prefix`` from ``http.<stat_prefix>.``, ``envoy_virtual_host`` and
``envoy_route`` from ``vhost.<vhost>.route.<prefix>.``, response code classes...). Legation's
names make those tags meaningful: clusters ``outbound|<service>[|<subset>]``, connection managers
``inbound_<service>``, ``outbound_<service>``, ``gateway_<name>``
(:mod:`legation.translate._names`), and route stats named after the mesh route. The bootstrap
adds two fixed tags on every stat, so a Prometheus scraping many admin endpoints needs no
relabelling: ``legation_node`` (the node id) and ``legation_service`` (the node cluster: the
service a sidecar belongs to, or the gateway's name).

**Cardinality.** Every tag value comes from the mesh file, never from a request. Route-level stats
(``vhost.<vhost>.route.<route>.*``: ~15 counters and a latency histogram per route and virtual
host) are kept for the first :data:`ROUTE_STATS_LIMIT` mesh routes; later routes have none (their
requests still count in their cluster's and listener's stats, and per route in the golden
metrics, which bound their own keys: :class:`legation.observe.aggregator.Limits`).
"""

from __future__ import annotations

from typing import Any

ROUTE_STATS_LIMIT = 100
"""Mesh routes (in file order) that get Envoy route-level stats."""


def stats_config(node_id: str, node_cluster: str) -> dict[str, Any]:
    """The bootstrap's ``stats_config``: Envoy's default tags plus the node's fixed ones."""
    return {
        "use_all_default_tags": True,
        "stats_tags": [
            {"tag_name": "legation_node", "fixed_value": node_id},
            {"tag_name": "legation_service", "fixed_value": node_cluster or node_id},
        ],
    }


def route_stat_prefix(index: int, name: str) -> str:
    """The stat prefix of mesh route ``index`` named ``name``: its name, or empty (no route
    stats) past :data:`ROUTE_STATS_LIMIT`."""
    return name if index < ROUTE_STATS_LIMIT else ""
