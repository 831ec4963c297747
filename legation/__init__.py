"""Legation: the staff that serves an Envoy.

The control plane (``legation.config``, ``legation.translate``, ``legation.certs``, and the xDS
protocol in ``legation.xds``) configures Envoys over ADS; the request-path services
(``legation.extauthz``, ``legation.extproc``, ``legation.ratelimit``) answer Envoy's gRPC
call-outs. ``legation.plugins`` is the one extension mechanism they share.
"""

__version__ = "0.1.0"

import os as _os

# Legation forks real Envoy processes (and `serve --workers` forks itself) while gRPC may be
# running. gRPC's fork handlers restart its pollers in the child between fork and exec, which can
# kill the child before Envoy starts; Legation never uses gRPC across a fork, so turn them off.
# This must happen before grpc is imported, hence here.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
