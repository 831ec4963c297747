"""ext_proc: ``envoy.service.ext_proc.v3.ExternalProcessor`` running a chain of filter plugins.

* :mod:`.sdk` is what a filter plugin is written against (hooks per phase, the request/response
  view, answers); :mod:`.filters` are the built-ins, registered like third-party ones.
* :mod:`.chain` orders a route's filters and the phases Envoy must send; :mod:`.guard` bounds each
  hook by the message deadline and applies the chain's failure mode; :mod:`.exchange` and
  :mod:`._wire` turn a stream's messages into hook calls and answers.
* :mod:`.servicer` is the gRPC boundary, :mod:`.service` starts it, :mod:`.config` validates
  chains, :mod:`.envoy_filter` builds the Envoy side, :mod:`.metrics` the Prometheus side.
"""

__all__ = [
    "chain",
    "config",
    "envoy_filter",
    "errors",
    "exchange",
    "filters",
    "guard",
    "metrics",
    "sdk",
    "service",
    "servicer",
]
