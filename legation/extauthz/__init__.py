"""ext_authz: ``envoy.service.auth.v3.Authorization/Check`` deciding with pluggable checks.

* :mod:`.request` builds the input document from a CheckRequest as opa-envoy-plugin does;
  :mod:`.response` turns a policy result or a check's :class:`~.checks.Decision` into a
  CheckResponse; :mod:`.servicer` is the one boundary where errors become denials (fail closed).
* :mod:`.checks` is the plugin protocol; the built-in checks are :mod:`.jwt` (with :mod:`.jwks`),
  :mod:`.rego` (OPA's engine in evaluator processes: :mod:`.policies`, :mod:`.evaluator`) and
  :mod:`.opa` (a remote OPA). :mod:`.policy_test` is ``legation policy test``.
* :mod:`.config` is the service's YAML; :mod:`.service` starts the gRPC server;
  :mod:`.observe` holds metrics and the decision log; :mod:`.envoy_filter` the Envoy side.
"""

__all__ = [
    "checks",
    "config",
    "envoy_filter",
    "errors",
    "evaluator",
    "jwks",
    "jwt",
    "observe",
    "opa",
    "policies",
    "policy_test",
    "rego",
    "request",
    "response",
    "service",
    "servicer",
]
