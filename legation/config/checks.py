"""The semantic pass: what a schema cannot say. Runs on a model the schema pass accepted.

Checks: unique names (services, instances, subsets, routes), references (routes, mirrors and
``mesh_hosts`` name defined services and subsets; subsets select at least one endpoint), split
weights summing to 100, one owner per listening port, settings that only make sense in one place
(retry budgets on services; timeouts, retries, mirrors and rewrites on forwarding routes), and the
request-path placeholders referring to services the mesh declares, the ``mtls`` block's
(:func:`legation.config.mtls.mtls_problems`) and the ``capture`` block's
(:func:`legation.config.capture.capture_problems`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from legation.certs.spiffe import TRACING, service_name
from legation.config.capture import capture_problems
from legation.config.errors import Problem
from legation.config.extensions import service_blocks
from legation.config.model import Mesh, Service
from legation.config.mtls import mtls_problems
from legation.config.policy import RoutePolicy
from legation.config.routes import Destination, Route
from legation.config.tracing import tracing_problems
from legation.services import kinds

_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]"}
_FORBIDDEN_HEADERS = {"host"}


def semantic_problems(mesh: Mesh) -> list[Problem]:
    return [
        *_names(mesh),
        *_subsets(mesh),
        *_ports(mesh),
        *(p for i, s in enumerate(mesh.services) for p in _service(mesh, i, s)),
        *(p for i, r in enumerate(mesh.routes) for p in _route(mesh, i, r)),
        *mtls_problems(mesh),
        *capture_problems(mesh),
        *tracing_problems(mesh),
        *_service_tls(mesh),
        *_accesslog(mesh),
    ]


def _duplicates(items: list[tuple[str, str]], what: str) -> Iterator[Problem]:
    """``items`` are (name, path); report every repeat, pointing at the first."""
    first: dict[str, str] = {}
    for name, path in items:
        if name in first:
            yield Problem(path, f"duplicate {what} name {name!r} (first at {first[name]})")
        else:
            first[name] = path


def _names(mesh: Mesh) -> Iterator[Problem]:
    yield from _duplicates(
        [(s.name, f"services[{i}].name") for i, s in enumerate(mesh.services)], "service"
    )
    yield from _duplicates(
        [
            (s.instance_name(j), f"services[{i}].endpoints[{j}]" + (".name" if e.name else ""))
            for i, s in enumerate(mesh.services)
            for j, e in enumerate(s.endpoints)
        ],
        "instance",
    )
    yield from _duplicates(
        [(r.name, f"routes[{i}].name") for i, r in enumerate(mesh.routes)], "route"
    )


def _subsets(mesh: Mesh) -> Iterator[Problem]:
    for i, s in enumerate(mesh.services):
        yield from _duplicates(
            [(sub.name, f"services[{i}].subsets[{k}].name") for k, sub in enumerate(s.subsets)],
            "subset",
        )
        for k, sub in enumerate(s.subsets):
            if not s.selected(sub.labels):
                yield Problem(
                    f"services[{i}].subsets[{k}].labels",
                    f"selects no endpoint of service {s.name!r}",
                )


def _ports(mesh: Mesh) -> Iterator[Problem]:
    """Every listening socket the mesh asks for has one owner."""
    wanted: list[tuple[str, int, str]] = [(mesh.xds.host, mesh.xds.port, "xds.port")]
    if mesh.gateway is not None:
        gw = mesh.gateway
        wanted.append((gw.host, gw.port, "gateway.port"))
        wanted.append(("127.0.0.1", gw.admin_port, "gateway.admin_port"))
    for i, s in enumerate(mesh.services):
        for j, e in enumerate(s.endpoints):
            at = f"services[{i}].endpoints[{j}]"
            wanted.append((e.host, e.port, f"{at}.port"))
            if e.sidecar is not None:
                wanted += [
                    (e.host, e.sidecar.inbound_port, f"{at}.sidecar.inbound_port"),
                    (e.host, e.sidecar.outbound_port, f"{at}.sidecar.outbound_port"),
                    ("127.0.0.1", e.sidecar.admin_port, f"{at}.sidecar.admin_port"),
                ]
    for kind, block in kinds.blocks(mesh):
        wanted += _worker_ports(block.host, block.worker_ports(block.port), kind.block, "port")
        http_port = getattr(block, "http_port", None)  # extauthz and extproc over HTTP
        if http_port is not None:
            http_ports = block.worker_ports(http_port)
            wanted += _worker_ports(block.host, http_ports, kind.block, "http_port")
    if mesh.tracing is not None and mesh.tracing.embedded:
        wanted.append((*mesh.tracing.address(), "tracing.port"))
    seen: list[tuple[str, int, str]] = []
    for host, port, path in wanted:
        if port > 65535:
            yield Problem(path, f"worker ports reach {port}, above 65535 (worker i: port + 100 i)")
            continue
        host = "127.0.0.1" if host == "localhost" else host
        clash = next(
            (
                p
                for h, n, p in seen
                if n == port and (h == host or h in _WILDCARD_HOSTS or host in _WILDCARD_HOSTS)
            ),
            None,
        )
        if clash is not None:
            yield Problem(path, f"port {port} is already used by {clash}")
        else:
            seen.append((host, port, path))


def _worker_ports(
    host: str, ports: list[int], block: str, field: str
) -> list[tuple[str, int, str]]:
    """The first worker's port is ``block.field``; the others' are named ``block.workers``."""
    return [(host, port, f"{block}.{'workers' if i else field}") for i, port in enumerate(ports)]


def _service_tls(mesh: Mesh) -> Iterator[Problem]:
    """``tls: mesh`` needs the mesh's mTLS (the certificates come from its CA); with mTLS on, the
    request-path services' and the trace receiver's SPIFFE names (``legation-<kind>``,
    ``legation-tracing``) belong to them alone."""
    for kind, block in service_blocks(mesh):
        if block.tls == "mesh" and not mesh.mtls.enabled:
            yield Problem(
                f"{kind}.tls",
                "'mesh' needs mtls.mode permissive or strict (the "
                "certificates come from the mesh CA); or set tls: none",
            )
    if not mesh.mtls.enabled:
        return
    reserved = {service_name(kind): "request-path service of that name" for kind in kinds.names()}
    reserved[service_name(TRACING)] = "trace receiver"
    named = [(f"services[{i}].name", s.name) for i, s in enumerate(mesh.services)]
    if mesh.gateway is not None:
        named.append(("gateway.name", mesh.gateway.name))
    for path, name in named:
        if name in reserved:
            yield Problem(
                path,
                f"{name!r} is reserved for Legation's {reserved[name]} "
                "(its SPIFFE identity with mTLS)",
            )


def _service(mesh: Mesh, i: int, s: Service) -> Iterator[Problem]:
    at = f"services[{i}]"
    yield from _policy(mesh, at, s, budget_allowed=True)
    if s.protocol == "tcp":
        for name in ("timeout", "retries", "fault", "mirror", "local_rate_limit"):
            if getattr(s, name) is not None:
                yield Problem(f"{at}.{name}", "applies to HTTP and gRPC services, not tcp")


def _route(mesh: Mesh, i: int, r: Route) -> Iterator[Problem]:
    at = f"routes[{i}]"
    if r.on_gateway and mesh.gateway is None:
        where = f"{at}.gateway" if r.gateway else at
        yield Problem(where, "the mesh declares no gateway (list mesh_hosts for mesh traffic)")
    if not r.on_gateway and not r.mesh_hosts:
        yield Problem(at, "applies nowhere: set gateway: true or list mesh_hosts")
    for k, host in enumerate(r.mesh_hosts):
        yield from _service_ref(mesh, f"{at}.mesh_hosts[{k}]", host)
    if r.to is not None:
        yield from _destination(mesh, f"{at}.to", r.to)
    if r.split is not None:
        for k, d in enumerate(r.split):
            yield from _destination(mesh, f"{at}.split[{k}]", d)
        yield from _duplicates(
            [(f"{d.service}/{d.subset or '*'}", f"{at}.split[{k}]") for k, d in enumerate(r.split)],
            "split destination",
        )
        total = sum(d.weight for d in r.split)
        if total != 100:
            yield Problem(f"{at}.split", f"weights sum to {total}, not 100")
    if not r.destinations():
        for name in ("timeout", "retries", "mirror", "rewrite"):
            if getattr(r, name) is not None:
                yield Problem(f"{at}.{name}", "only applies to routes with 'to' or 'split'")
        if r.rate_limits:  # Envoy's route-level rate limits live in the RouteAction
            yield Problem(f"{at}.rate_limits", "only applies to routes with 'to' or 'split'")
    yield from _policy(mesh, at, r, budget_allowed=False)
    yield from _match(at, r)
    for side in ("request", "response"):
        changes = getattr(r.headers, side)
        names = [*changes.add, *changes.set, *changes.remove]
        for name in names:
            if name.startswith(":") or name.lower() in _FORBIDDEN_HEADERS:
                yield Problem(f"{at}.headers.{side}", f"header {name!r} cannot be modified")
    yield from _extensions(mesh, at, r)


def _match(at: str, r: Route) -> Iterator[Problem]:
    regexes = [(f"{at}.match.path.regex", r.match.path.regex)]
    regexes += [(f"{at}.match.headers[{k}].regex", h.regex) for k, h in enumerate(r.match.headers)]
    regexes += [(f"{at}.match.query[{k}].regex", q.regex) for k, q in enumerate(r.match.query)]
    for k, q in enumerate(r.match.query):
        if q.invert or q.present is False:
            message = "query parameters support neither invert nor present: false"
            yield Problem(f"{at}.match.query[{k}]", message)
    for path, regex in regexes:
        if regex is None:
            continue
        try:
            re.compile(regex)
        except re.error as exc:
            yield Problem(path, f"invalid regular expression {regex!r}: {exc}")


def _policy(mesh: Mesh, at: str, p: RoutePolicy, *, budget_allowed: bool) -> Iterator[Problem]:
    if p.retries is not None and p.retries.budget is not None and not budget_allowed:
        yield Problem(
            f"{at}.retries.budget", "a retry budget is a cluster setting: set it on the service"
        )
    if p.retries is not None and p.retries.retriable_status_codes:
        if "retriable-status-codes" not in p.retries.retry_on:
            yield Problem(
                f"{at}.retries.retriable_status_codes",
                "needs 'retriable-status-codes' in retry_on",
            )
    if p.mirror is not None:
        yield from _destination(mesh, f"{at}.mirror", p.mirror)


def _service_ref(mesh: Mesh, path: str, name: str) -> Iterator[Problem]:
    service = mesh.service(name)
    if service is None:
        yield Problem(path, f"unknown service {name!r}")
    elif service.protocol == "tcp":
        yield Problem(path, f"service {name!r} is tcp; HTTP routes cannot reach it")


def _destination(mesh: Mesh, at: str, d: Destination | object) -> Iterator[Problem]:
    service_name: str = getattr(d, "service")  # noqa: B009 - Destination and Mirror
    subset: str | None = getattr(d, "subset")  # noqa: B009
    problems = list(_service_ref(mesh, f"{at}.service", service_name))
    yield from problems
    service = mesh.service(service_name)
    if not problems and service is not None and subset is not None and not service.subset(subset):
        yield Problem(f"{at}.subset", f"service {service_name!r} has no subset {subset!r}")


def _extensions(mesh: Mesh, at: str, r: Route) -> Iterator[Problem]:
    if r.authz is not None and r.authz != "disabled" and mesh.extauthz is None:
        yield Problem(f"{at}.authz", "needs an extauthz service (mesh-level 'extauthz')")
    if r.filters and mesh.extproc is None:
        yield Problem(f"{at}.filters", "needs an extproc service (mesh-level 'extproc')")
    if r.rate_limits and mesh.ratelimit is None:
        yield Problem(f"{at}.rate_limits", "needs a rate-limit service (mesh-level 'ratelimit')")


def _accesslog(mesh: Mesh) -> Iterator[Problem]:
    """``accesslog.proxies`` names proxies of this mesh (node ids, as ``legation status``)."""
    if mesh.accesslog is None:
        return
    nodes = {p.node_id for p in mesh.proxies()}
    for node in mesh.accesslog.proxies:
        if node not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            yield Problem(f"accesslog.proxies.{node}", f"no proxy {node!r} (proxies: {known})")
