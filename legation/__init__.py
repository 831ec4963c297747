"""Legation: the staff that serves an Envoy.

The control plane (``legation.xds``, ``legation.config``, ``legation.certs``) configures Envoys over
ADS; the request-path services (``legation.extauthz``, ``legation.extproc``, ``legation.ratelimit``)
answer Envoy's gRPC call-outs. ``legation.plugins`` is the one extension mechanism they share.
"""

__version__ = "0.1.0"
