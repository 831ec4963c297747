"""From what an access-log entry says to the service names golden metrics are keyed by.

Legation's Envoy names (:mod:`legation.translate._names`, :mod:`legation.config.proxies`):

* a proxy's node ``cluster`` is its service's name on a sidecar, the gateway's name on a gateway;
  that is the **source** of the requests it sends upstream;
* an upstream cluster ``outbound|<service>`` or ``outbound|<service>|<subset>`` is the
  **destination** ``<service>`` (subsets of one service are one destination);
* ``inbound|<service>`` is a sidecar handing a request to its own app: that request was already
  counted, as a pair, by the proxy that sent it, so it counts for the proxy only
  (:func:`destination` answers None);
* no upstream cluster (a ``direct_response``, a fault abort, no route matched) is
  :data:`LOCAL`: the proxy answered itself;
* any other cluster name (a static cluster outside the mesh) is itself.

Every name that becomes a label goes through :func:`label_value` (printable, bounded length).
"""

from __future__ import annotations

__all__ = ["LOCAL", "NO_ROUTE", "OTHER", "destination", "label_value", "source"]

LOCAL = "-"
"""The destination of a request the proxy answered itself."""
NO_ROUTE = "-"
"""The route label of a request no named route matched."""
OTHER = "other"
"""The label value every key past a cardinality limit is counted under."""

MAX_LABEL_LENGTH = 96

_OUTBOUND = "outbound|"
_INBOUND = "inbound|"


def destination(upstream_cluster: str) -> str | None:
    """The destination service of an upstream cluster; None for a sidecar's inbound cluster."""
    if not upstream_cluster:
        return LOCAL
    if upstream_cluster.startswith(_OUTBOUND):
        return label_value(upstream_cluster[len(_OUTBOUND) :].split("|", 1)[0])
    if upstream_cluster.startswith(_INBOUND):
        return None
    return label_value(upstream_cluster)


def source(node_cluster: str, node_id: str) -> str:
    """The source service of a proxy: its node cluster, else its node id."""
    return label_value(node_cluster or node_id)


def label_value(raw: str) -> str:
    """``raw`` as a label value: printable ASCII, at most :data:`MAX_LABEL_LENGTH` characters
    (longer ones cut, with ``~`` marking the cut); empty becomes :data:`LOCAL`."""
    clean = "".join(c if " " < c < "\x7f" else "_" for c in raw)
    if not clean:
        return LOCAL
    if len(clean) > MAX_LABEL_LENGTH:
        clean = clean[: MAX_LABEL_LENGTH - 1] + "~"
    return clean
