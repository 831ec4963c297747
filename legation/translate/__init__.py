"""Legation's model in Envoy terms: per-proxy snapshots, static bootstraps, ADS bootstraps.

The mesh side of the control plane. It reads the mesh (:mod:`legation.config`), the certificates'
SDS names (:mod:`legation.certs`) and the request-path services' Envoy wiring (their
``envoy_filter`` modules), and produces what :mod:`legation.xds` serves; the protocol package never
imports this one.

* :mod:`~legation.translate.mesh`: :func:`translate`, mesh -> one consistent snapshot per proxy;
  its parts are ``_clusters`` (clusters and EDS), ``_listeners``, ``_routes``, ``_mtls`` (TLS
  contexts over SDS, the SDS check), ``_services`` (the request-path services' filters, clusters
  and per-route settings), ``_capture`` (what transparent capture changes; its
  :func:`relay_targets` are what ``legation up`` relays into the pods) and ``_names`` (resource
  and filter names);
* :mod:`~legation.translate.static`: :func:`static_bootstrap`, a snapshot inlined into a static
  Envoy bootstrap (no control plane needed);
* :mod:`~legation.translate.bootstrap`: ``bootstrap()``, the bootstrap that points a proxy at the
  xDS server over ADS (import it from its module: the name is the module's too).

Protobuf builders shared with the services' Envoy wiring are in :mod:`legation._proto`.
"""

from legation.translate._capture import relay_targets
from legation.translate.mesh import Secrets, translate
from legation.translate.static import static_bootstrap

__all__ = ["Secrets", "relay_targets", "static_bootstrap", "translate"]
