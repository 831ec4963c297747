"""The fault scenarios: each builds its stack, runs bounded load, breaks one thing, and returns
the figures (:class:`~tests.faults.load.Report`). The tests assert on them; ``bench/faults.py``
prints them as one table. ``scale`` stretches the load and the fault (1 in CI; the soak uses more).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from legation import plugins
from legation.extproc.exchange import Exchange
from legation.extproc.sdk import Filter
from tests.faults.harness import LEGATION, REPO, Stack, listening, metric, rss_kb, wait_for
from tests.faults.load import Probe, Report, Sample, recovered, report

AUTHZ_YAML = """\
checks:
  rego: {type: rego, options: {policy_dir: policies, reload_interval_s: 0.1}}
default_checks: [rego]
"""

LIMITS_YAML = """\
domain: faults
descriptors:
  - key: generic_key
    value: limited
    descriptors:
      - key: user
        rate_limit: {{unit: {unit}, requests_per_unit: {limit}}}
"""


def _policies(stack: Stack) -> Path:
    """A private copy of the quickstart policy (x-role admin: allowed; none: 403)."""
    target = stack.tmp / "policies"
    shutil.copytree(REPO / "policies" / "quickstart", target, dirs_exist_ok=True)
    return target


ADMIN = Probe("admin", "/admin", {"x-role": "admin"})
DENIED = Probe("no-role", "/admin", denied=True, ok=(403,))
OPEN = Probe("open", "/open")


# -- ext_authz killed and restarted ----------------------------------------------------------

EXTAUTHZ_MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: off}}
gateway: {{name: gw, port: {gw}, admin_port: {gw_admin}}}
extauthz: {{port: {authz}, embedded: false, failure_mode: closed}}
services:
  - name: web
    port: 9080
    endpoints: [{{port: {app}}}]
routes:
  - name: admin
    match: {{path: {{prefix: /admin}}}}
    to: {{service: web}}
    authz: quickstart.authz
  - {{name: open, match: {{path: {{prefix: /}}}}, to: {{service: web}}}}
"""


def extauthz_killed(tmp: Path, scale: float = 1.0) -> Report:
    """ext_authz alone (``legation serve extauthz``) killed under load, restarted; Envoy kept."""
    with Stack(tmp) as stack:
        ports = stack.ports("xds", "gw", "gw_admin", "authz")
        app = stack.app("web")
        _policies(stack)
        authz = stack.write("authz.yaml", AUTHZ_YAML)
        mesh = stack.write("mesh.yaml", EXTAUTHZ_MESH.format(**ports, app=app.port))
        service = stack.serve(
            "extauthz",
            port=ports["authz"],
            args=["--config", str(authz), "--listen", f"127.0.0.1:{ports['authz']}"],
        )
        stack.control_plane(mesh)
        stack.proxies(xds_port=ports["xds"])
        envoy_pid = stack.envoys["gateway-gw"].proc.pid  # type: ignore[union-attr]
        probes = [ADMIN, DENIED, OPEN]
        load = stack.load(ports["gw"], probes, duration=5 * scale)  # >2 s after the restart
        time.sleep(0.8 * scale)
        killed_at = time.time()
        service.kill()
        time.sleep(1.2 * scale)
        service.start()
        restarted_at = time.time()
        samples = load.finish()
        envoy_same = stack.envoys["gateway-gw"].proc.pid == envoy_pid  # type: ignore[union-attr]
        result = report(
            "extauthz killed",
            probes,
            samples,
            restored_at=restarted_at,
            ignore=(killed_at, restarted_at),
            extra={
                "resumed": recovered(probes, samples, restarted_at),
                "envoy_restarted": not envoy_same,
            },
        )

        return result


# -- the mesh with embedded services (invalid configs, reloads, ext_proc faults, Redis) -----

SERVICES_MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: off}}
gateway: {{name: gw, port: {gw}, admin_port: {gw_admin}}}
extauthz: {{port: {authz}, config: authz.yaml}}
extproc: {{port: {proc}, timeout: 200ms}}
ratelimit: {{port: {rl}, config: limits.yaml, domain: faults, failure_mode: {rl_mode}{rl_store}}}
services:
  - name: web
    port: 9080
    endpoints: [{{port: {app}}}]
routes:
  - name: admin
    match: {{path: {{prefix: /admin}}}}
    to: {{service: web}}
    authz: quickstart.authz
  - name: limited
    match: {{path: {{prefix: /limited}}}}
    to: {{service: web}}
    rate_limits:
      - actions:
          - {{generic_key: {{value: limited}}}}
          - {{request_headers: {{header: x-user, key: user}}}}
  - {{name: fragile, match: {{path: {{prefix: /fragile}}}}, to: {{service: web}},
     filters: [{{name: fault_t}}]}}
  - name: open
    match: {{path: {{prefix: /}}}}
    to: {{service: web}}
    filters: [{{name: headers, options: {{request: {{set: {{x-tag: "{tag}"}}}}}}}}]
    headers: {{response: {{set: {{x-generation: "{tag}"}}}}}}
"""


class FaultFilter(Filter):
    """ext_proc filter for the suite: ``x-fault: raise`` raises, ``x-fault: hang`` never
    answers (the phase's timeout must end it); anything else passes untouched."""

    name = "fault_t"

    async def on_request_headers(self, ex: Exchange) -> None:
        fault = ex.request_headers.get("x-fault")
        if fault == "raise":
            raise RuntimeError("a fault-suite filter raising on purpose")
        if fault == "hang":
            await asyncio.sleep(30)


class _FaultFilterFactory:
    name = "fault_t"

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> Filter:
        return FaultFilter()


class ServicesMesh:
    """A gateway, one app, and the three request-path services embedded in an in-process
    control plane; ``write(tag=...)`` saves the mesh (a valid change per new tag)."""

    def __init__(
        self,
        stack: Stack,
        *,
        rl_mode: str = "open",
        rl_store: str = "",
        limit: int = 1_000_000,
        unit: str = "minute",
        debounce: float = 0.05,
    ) -> None:
        plugins.register("extproc.filter", _FaultFilterFactory())
        self.stack = stack
        self.ports = stack.ports("xds", "gw", "gw_admin", "authz", "proc", "rl")
        self.app = stack.app("web")
        self.rl_mode, self.rl_store = rl_mode, rl_store
        _policies(stack)
        self.authz = stack.write("authz.yaml", AUTHZ_YAML)
        self.limits = stack.write("limits.yaml", LIMITS_YAML.format(unit=unit, limit=limit))
        self.mesh = self.write(tag="0")
        self.cp = stack.control_plane(self.mesh, debounce=debounce)
        stack.proxies(xds_port=self.ports["xds"])

    def text(self, *, tag: str) -> str:
        return SERVICES_MESH.format(
            **self.ports, app=self.app.port, tag=tag, rl_mode=self.rl_mode, rl_store=self.rl_store
        )

    def write(self, *, tag: str) -> Path:
        return self.stack.write("mesh.yaml", self.text(tag=tag))

    def reload(self) -> bool:
        return self.stack.loop.run(self.cp.reload())

    def acked(self) -> dict[str, dict[str, str]]:
        return {p["node_id"]: p["acked"] for p in self.stack.status()["proxies"]}


LIMITED = Probe("limited", "/limited", {"x-user": "steady"}, ok=(200, 429))
TAGGED = Probe("open+extproc", "/open")


# -- invalid mesh / policy / rate-limit config, 20 saves in a row ------------------------------


def _bad_mesh(good: str) -> list[str]:
    """Ten invalid meshes, each wrong in its own way."""
    return [
        good + "colour: blue\n",  # unknown key
        good.replace("to: {service: web}", "to: {service: nosuch}", 1),  # unknown service
        good.replace("admin_port:", "admin_port: 70000, x:", 1),  # port out of range
        good.replace("timeout: 200ms", "timeout: soon"),  # bad duration
        good + "routes: [\n",  # YAML syntax
        good.replace("{name: fault_t}", "{name: no_such_filter}"),  # unknown plugin
        good.replace("quickstart.authz", "nosuch.authz"),  # unknown policy
        good.replace("name: limited", "name: admin"),  # duplicate route
        good.replace("domain: faults", "domain: elsewhere"),  # domain not in file
        good.replace("name: open\n", "name: open\n    colour: red\n"),  # unknown route key
    ]


BAD_REGO = [
    "package quickstart.authz\n\nallow := {{{{ {n}\n",
    "package quickstart.authz\n\nallow if input.x == \n# {n}\n",
    "package quickstart.authz\nimport rego.v1\nallow := true if {{ ) }} # {n}\n",
    "packge quickstart.authz # {n}\n",
    "package quickstart.authz\nimport rego.v1\nallow := decision( # {n}\n",
]
_ONE_LIMIT = "domain: faults\ndescriptors:\n  - key: k\n    rate_limit: {{unit: {unit}, "
BAD_LIMITS = [
    _ONE_LIMIT.replace("{unit}", "fortnight") + "requests_per_unit: 1}} # {n}\n",
    "domain: faults\ncolour: blue # {n}\n",
    _ONE_LIMIT.replace("{unit}", "second") + "requests_per_unit: -1}} # {n}\n",
    "domain: faults\ndescriptors: [ # {n}\n",
    "descriptors: [] # {n}\n",
]


def _rejections(stack: Stack) -> tuple[float, float]:
    """(mesh changes rejected, policy reloads the ext_authz service refused)."""
    text = stack.metrics()
    return (
        metric(text, "legation_config_reloads_total", result="rejected"),
        metric(text, "legation_extauthz_policy_reload_failures_total"),
    )


def _changed(stack: Stack, before: tuple[float, float]) -> bool:
    return _rejections(stack) != before


def invalid_configs(tmp: Path, scale: float = 1.0) -> Report:
    with Stack(tmp) as stack:
        mesh = ServicesMesh(stack)
        good_mesh = mesh.text(tag="0")
        rego = stack.tmp / "policies" / "authz.rego"
        good_rego, good_limits = rego.read_text(), mesh.limits.read_text()
        generation, acked = stack.status()["generation"], mesh.acked()
        probes = [ADMIN, DENIED, LIMITED, TAGGED]
        saves: list[tuple[Path, str]] = [(mesh.mesh, bad) for bad in _bad_mesh(good_mesh)]
        saves += [(rego, bad.format(n=n)) for n, bad in enumerate(BAD_REGO)]
        saves += [(mesh.limits, bad.format(n=n)) for n, bad in enumerate(BAD_LIMITS)]
        load = stack.load(mesh.ports["gw"], probes, duration=3.5 * scale)
        reported = in_status = applied = 0
        for path, text in saves:
            for other, good in (
                (mesh.mesh, good_mesh),
                (rego, good_rego),
                (mesh.limits, good_limits),
            ):
                if other != path:
                    other.write_text(good)
            before = _rejections(stack)
            path.write_text(text)
            applied += mesh.reload()
            try:  # the mesh and its files are checked at reload; Rego by the policy store
                wait_for(partial(_changed, stack, before), 3, f"{path.name} rejected")
                reported += 1
            except TimeoutError:
                pass
            in_status += path.name in (stack.status()["last_error"] or "")
            time.sleep(max(0.0, 2.5 * scale / len(saves) - 0.1))
        samples = load.finish()
        unchanged = stack.status()["generation"] == generation and mesh.acked() == acked
        return report(
            "invalid config x20",
            probes,
            samples,
            extra={
                "saves": len(saves),
                "rejections_reported": reported,
                "named_in_status": in_status,
                "counted_applied": applied,
                "running_config_unchanged": unchanged,
            },
        )


def _callout_errors(stack: Stack) -> dict[str, int]:
    """The gateway's ext_authz / ext_proc call-outs that did not end in an answer."""
    stats = stack.envoys["gateway-gw"].stats(r"^http\..*\.(ext_authz|ext_proc)\.")
    return {
        name.split(".", 2)[2]: value
        for name, value in stats.items()
        if value and any(w in name for w in ("error", "timeout", "failure", "reset"))
    }


# -- 100 valid reloads, as fast as they are taken -------------------------------------------


def valid_reloads(tmp: Path, scale: float = 1.0) -> Report:
    with Stack(tmp) as stack:
        mesh = ServicesMesh(stack, debounce=0.1)  # the product's default debounce
        reloads = 100  # the count is the scenario; scale stretches only the load
        pushes = lambda: metric(stack.metrics(), "legation_xds_pushes_total")  # noqa: E731
        for n in range(10):  # warm-up: first translations, first pushes
            mesh.write(tag=f"warm{n}")
            mesh.reload()
        wait_for(lambda: all(p["in_sync"] for p in stack.status()["proxies"]), 20, "in sync")
        rss_before, pushed_before = rss_kb(os.getpid()), pushes()
        generation = stack.status()["generation"]
        load = stack.load(mesh.ports["gw"], [ADMIN, DENIED, LIMITED, TAGGED], duration=60 * scale)
        started = time.time()
        for n in range(reloads):
            mesh.write(tag=str(n))
            mesh.reload()
        took = time.time() - started
        wait_for(lambda: all(p["in_sync"] for p in stack.status()["proxies"]), 20, "in sync")
        samples = load.finish(early=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{mesh.ports['gw']}/open") as resp:
            served = (
                json.loads(resp.read())["headers"].get("x-tag"),
                resp.headers.get("x-generation"),
            )
        return report(
            "100 valid reloads",
            [ADMIN, DENIED, LIMITED, TAGGED],
            samples,
            extra={
                "reloads": stack.status()["generation"] - generation,
                "reload_s": round(took, 2),
                "pushes": int(pushes() - pushed_before),
                "last_served": served == (str(reloads - 1),) * 2,
                **_callout_errors(stack),
                "rss_growth_kb": rss_kb(os.getpid()) - rss_before,
            },
        )


# -- an ext_proc filter raising / hanging on some requests ----------------------------------

RAISES = Probe("fragile:raise", "/fragile", {"x-fault": "raise"}, ok=(500,), denied=True)
# Envoy's message_timeout and the service's deadline are the same 200 ms: whichever fires first
# answers, 504 from Envoy or 500 from the service; both are the route failing closed.
HANGS = Probe("fragile:hang", "/fragile", {"x-fault": "hang"}, ok=(500, 504), denied=True)
FRAGILE_OK = Probe("fragile:ok", "/fragile")


def extproc_faults(tmp: Path, scale: float = 1.0) -> Report:
    """The route's failure behaviour is the mesh's ``extproc.failure_mode: closed``: 500 within
    the 200 ms message timeout; a 2xx on a faulty request would be a leak."""
    with Stack(tmp) as stack:
        mesh = ServicesMesh(stack)
        probes = [RAISES, HANGS, FRAGILE_OK, TAGGED, ADMIN]
        samples = stack.load(mesh.ports["gw"], probes, duration=3 * scale).finish()
        slowest = {p.name: 0.0 for p in probes}
        for s in samples:
            slowest[probes[s.probe].name] = max(slowest[probes[s.probe].name], s.end - s.start)
        return report(
            "ext_proc raising/hanging",
            probes,
            samples,
            hang_bound=1.0,
            extra={
                "slowest_hang_ms": round(1000 * slowest[HANGS.name]),
                "slowest_other_ms": round(1000 * max(slowest[p.name] for p in probes[2:])),
            },
        )


# -- Redis stopped, slowed, restarted under the rate limiter's failure mode -----------------

REDIS_LIMIT = 20  # per second, for the user "flood"
FLOOD = Probe("limited:flood", "/limited", {"x-user": "flood"}, ok=(200, 429))


def _admitted_per_second(samples: list[Sample], probe: int, start: float, end: float) -> list[int]:
    """200s of ``probe`` per whole wall-clock second (the fixed window) within [start, end)."""
    counts: dict[int, int] = {}
    for s in samples:
        if s.probe == probe and s.status == 200 and start <= s.end < end:
            counts[int(s.end)] = counts.get(int(s.end), 0) + 1
    return [counts.get(sec, 0) for sec in range(int(start) + 1, int(end))]


def redis_outage(tmp: Path, scale: float = 1.0, *, mode: str = "open") -> Report:
    """Redis behind a delaying proxy: slowed (+200 ms, past the 100 ms store timeout), killed,
    restarted on its port. ``mode`` is the mesh's ``ratelimit.failure_mode``."""
    with Stack(tmp) as stack:
        redis_port = stack.ports("redis")["redis"]
        redis = stack.redis(redis_port)
        proxy = stack.delay_proxy(redis_port)
        mesh = ServicesMesh(
            stack,
            rl_mode=mode,
            unit="second",
            limit=REDIS_LIMIT,
            rl_store=f", backend: redis, redis_url: 'redis://127.0.0.1:{proxy.port}/0'",
        )
        probes = [FLOOD, OPEN, ADMIN]
        load = stack.load(mesh.ports["gw"], probes, rate=300, duration=5 * scale)
        time.sleep(1.0 * scale)
        slowed_at = time.time()
        proxy.delay = 0.2
        time.sleep(1.0 * scale)
        proxy.delay = 0.0
        redis.kill()
        time.sleep(1.0 * scale)
        redis.start()
        restarted_at = time.time()
        samples = load.finish()
        refused_after = sorted(
            s.end for s in samples if s.probe == 0 and s.status == 429 and s.start >= restarted_at
        )
        outage = sum(
            1
            for s in samples
            if s.probe == 0 and s.status == 200 and slowed_at <= s.end < restarted_at
        )
        result = report(
            f"redis slowed/killed ({mode})",
            probes,
            samples,
            ignore=(slowed_at, restarted_at) if mode == "closed" else None,
            restored_at=restarted_at,
            extra={
                "limit_per_s": REDIS_LIMIT,
                "outage_admitted_per_s": round(outage / (restarted_at - slowed_at)),
                "store_failures": int(
                    metric(stack.metrics(), "legation_ratelimit_failure_mode_total")
                ),
                "counting_resumed": bool(refused_after),
            },
        )
        # leaked: admitted over the limit in a whole second (the fixed window), the whole run
        result.leaked = sum(
            max(0, n - REDIS_LIMIT)
            for n in _admitted_per_second(samples, 0, load.started_at, time.time())
        )
        # recovery: from the restart to the first request refused by a counter again
        result.recovery_s = refused_after[0] - restarted_at if refused_after else None
        return result


# -- workload certificates rotated every second under load, strict mTLS ---------------------

MTLS_MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: strict, ca_dir: ca, cert_ttl: 10s}}
gateway: {{name: gw, port: {gw}, admin_port: {gw_admin}}}
services:
  - name: web
    port: 9080
    endpoints:
      - {{name: web-1, port: {app}, sidecar: {{inbound_port: {inb}, outbound_port: {out},
         admin_port: {admin}}}}}
routes:
  - {{name: open, match: {{path: {{prefix: /}}}}, to: {{service: web}}}}
"""


class MtlsMesh:
    """A gateway calling one app through its sidecar over strict mTLS, certificates short-lived."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ports = stack.ports("xds", "gw", "gw_admin", "inb", "out", "admin")
        app = stack.app("web")
        self.mesh = stack.write("mesh.yaml", MTLS_MESH.format(**self.ports, app=app.port))
        self.cp = stack.control_plane(self.mesh)
        stack.proxies(xds_port=self.ports["xds"])

    def serials(self) -> dict[str, str]:
        return {p["node_id"]: p["certificate"]["serial"] for p in self.stack.status()["proxies"]}

    def served_serial(self, node: str) -> set[str]:
        """Serials of the certificates the proxy's Envoy holds now (admin /certs)."""
        certs = json.loads(self.stack.envoys[node].admin_get("/certs"))["certificates"]
        return {
            c["serial_number"].lower().lstrip("0")
            for cert in certs
            for c in cert.get("cert_chain", [])
        }


def cert_rotation(tmp: Path, scale: float = 1.0) -> Report:
    """Every proxy's certificate re-issued every ~0.7 s (the renewal path, forced) on top of the
    10 s cert_ttl timer, under load through gateway -> sidecar over strict mTLS."""
    with Stack(tmp) as stack:
        mesh = MtlsMesh(stack)
        probes = [OPEN]
        seen = [mesh.serials()]
        load = stack.load(mesh.ports["gw"], probes, duration=4 * scale)
        deadline = time.time() + 3.5 * scale
        while time.time() < deadline:
            time.sleep(0.7)
            stack.run(lambda: mesh.cp.rotate(force=True))
            seen.append(mesh.serials())
        samples = load.finish()
        node = next(n for n in seen[-1] if n != "gateway-gw")
        wait_for(
            lambda: seen[-1][node].lower().lstrip("0") in mesh.served_serial(node),
            10,
            "the sidecar serving its last certificate",
        )
        return report(
            "workload cert rotation",
            probes,
            samples,
            extra={
                "rotations": len(seen) - 1,
                "distinct_serials": len({s for snap in seen for s in snap.values()}),
            },
        )


# -- scenarios that needed the service-model change (the services in processes of their own) --


def _status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc
    except OSError:
        return None


def _in_sync(port: int) -> bool:
    doc = _status(port)
    return bool(doc and doc["proxies"] and all(p["in_sync"] for p in doc["proxies"]))


def _processes(stack: Stack) -> dict[str, dict[str, Any]]:
    """The Legation processes `legation up` supervises, by role (its processes file)."""
    try:
        listed = json.loads((stack.tmp / ".legation" / "processes.json").read_text())
    except (OSError, ValueError):
        return {}
    return {p["role"]: p for p in listed if p["role"] != "envoy"}


def _kill(pid: int | None) -> bool:
    """SIGKILL ``pid``; whether there was one to kill."""
    if not pid:
        return False
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return False
    return True


def _certificates(doc: dict[str, Any]) -> dict[str, str]:
    """Serial of every proxy's and service's certificate in a status document."""
    out = {
        p["node_id"]: p["certificate"]["serial"]
        for p in doc.get("proxies", [])
        if "certificate" in p
    }
    services = (doc.get("mtls") or {}).get("services", {})
    return {**out, **{k: v["serial"] for k, v in services.items()}}


def control_plane_killed(tmp: Path, scale: float = 1.0, *, mtls: str = "off") -> Report:
    """``legation up`` under load: its control-plane process (``legation serve xds``) killed,
    and killed again each time it comes back, for a while; then left to be restarted. The
    request-path services are processes of their own: every route should keep serving,
    call-outs included; on return the Envoys resync with the same versions and, with ``mtls``
    strict, every proxy and service keeps its certificate (none re-issued)."""
    with Stack(tmp) as stack:
        ports = stack.ports("xds", "gw", "gw_admin", "authz", "proc", "rl", "status")
        app = stack.app("web")
        _policies(stack)
        stack.write("authz.yaml", AUTHZ_YAML)
        stack.write("limits.yaml", LIMITS_YAML.format(unit="minute", limit=1_000_000))
        mesh = stack.write(
            "mesh.yaml",
            SERVICES_MESH.replace(
                "  - {{name: fragile, match: {{path: {{prefix: /fragile}}}}, "
                "to: {{service: web}},\n"
                "     filters: [{{name: fault_t}}]}}\n",
                "",
            )
            .replace("mtls: {{mode: off}}", f"mtls: {{{{mode: {mtls}}}}}")
            .format(**ports, app=app.port, tag="0", rl_mode="open", rl_store=""),
        )
        stack.child(
            [
                *LEGATION,
                "up",
                str(mesh),
                "--plain",
                "--status-port",
                str(ports["status"]),
                "--log-dir",
                str(stack.tmp / "up-logs"),
            ],
            port=ports["status"],
            name="up",
        )
        wait_for(lambda: _in_sync(ports["status"]), 60, "every Envoy in sync")
        before = _status(ports["status"])
        assert before is not None
        acked = {p["node_id"]: p["acked"] for p in before["proxies"]}
        probes = [ADMIN, DENIED, LIMITED, TAGGED]
        load = stack.load(ports["gw"], probes, duration=5 * scale)
        time.sleep(1.0 * scale)
        killed_at, kills = time.time(), 0
        while time.time() < killed_at + 2.5 * scale:  # away: killed whenever it is back
            kills += _kill(_processes(stack).get("xds", {}).get("pid"))
            time.sleep(0.05)
        released_at = time.time()
        wait_for(lambda: _in_sync(ports["status"]), 30, "the control plane back, Envoys in sync")
        back_at = time.time()
        samples = load.finish()
        after = _status(ports["status"]) or {}
        roles = _processes(stack)
        return report(
            f"control plane killed (mtls {mtls})",
            probes,
            samples,
            restored_at=released_at,
            extra={
                "away_s": round(back_at - killed_at, 1),
                "kills": kills,
                "xds_restarts": roles.get("xds", {}).get("restarts"),
                "services_restarted": sum(
                    p["restarts"] for r, p in roles.items() if r not in ("xds", "up")
                ),
                "versions_kept": {p["node_id"]: p["acked"] for p in after.get("proxies", [])}
                == acked,
                "certificates_kept": _certificates(after) == _certificates(before),
                "certificates": len(_certificates(before)),
            },
        )


def _fresh_handshakes(
    stack: Stack, mesh: MtlsMesh, stop: threading.Event, counts: dict[str, int]
) -> None:
    """A peer proxy that shakes hands anew for every request (Envoy keeps its pooled upstream
    connections across SDS updates, so the load above rarely handshakes): the gateway's current
    certificate, trusting the current bundle, straight into the sidecar's inbound listener."""
    cp, port = mesh.cp, mesh.ports["inb"]
    while not stop.is_set():
        cert, bundle = stack.run(lambda: (cp.issuer.certs["gateway-gw"], cp.issuer.bundle_pem))
        context = ssl.create_default_context(cadata=bundle.decode())
        context.check_hostname = False  # a SPIFFE id, no host name
        folder = stack.tmp / "peer"
        folder.mkdir(mode=0o700, exist_ok=True)
        (folder / "cert.pem").write_bytes(cert.cert_pem)
        (folder / "key.pem").write_bytes(cert.key_pem)
        context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                context.wrap_socket(raw) as tls,
            ):
                tls.sendall(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
                ok = tls.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        counts["sent"] += 1
        counts["failed"] += not ok
        time.sleep(0.02)


def _served_roots(stack: Stack, node: str) -> tuple[set[str], set[str]]:
    """What a proxy's Envoy holds now for the mesh (admin /certs, the xDS channel's own context
    left out): the serials of its certificate chain and of the roots it trusts."""
    certs = [
        c
        for c in json.loads(stack.envoys[node].admin_get("/certs"))["certificates"]
        if not any(
            san.get("uri", "").startswith("spiffe://xds.legation.internal")
            for leaf in c.get("cert_chain", [])
            for san in leaf.get("subject_alt_names", [])
        )
    ]
    chain = {
        c["serial_number"].lower().lstrip("0") for cert in certs for c in cert.get("cert_chain", [])
    }
    trusted = {
        c["serial_number"].lower().lstrip("0") for cert in certs for c in cert.get("ca_cert", [])
    }
    return chain, trusted


def root_rotation(tmp: Path, scale: float = 1.0) -> Report:
    """``legation ca rotate-root`` under load, strict mTLS between gateway and sidecar: the
    running control plane trusts both roots, moves every certificate to the new one once every
    proxy ACKed the bundle, retires the old one after the overlap; no request fails, including
    a peer handshaking anew for each. At the end every proxy's Envoy holds a certificate from
    the new root and trusts the new root only."""
    with Stack(tmp) as stack:
        mesh = MtlsMesh(stack)
        cp = mesh.cp
        old = stack.run(lambda: cp.issuer.ca.cert.serial_number)  # type: ignore[union-attr]
        probes = [OPEN]
        load = stack.load(mesh.ports["gw"], probes, duration=30 * scale)
        stop, fresh = threading.Event(), {"sent": 0, "failed": 0}
        peer = threading.Thread(target=_fresh_handshakes, args=(stack, mesh, stop, fresh))
        peer.start()
        try:
            time.sleep(1.0 * scale)
            rotate = subprocess.run(
                [*LEGATION, "ca", "rotate-root", "--mesh", str(mesh.mesh), "--overlap", "1s"],
                capture_output=True,
                text=True,
                cwd=stack.tmp,
            )
            phases: list[str] = []

            def done() -> bool:
                rotation = stack.status()["mtls"]["ca"]["rotation"]
                phase = rotation["phase"] if rotation else "done"
                if not phases or phases[-1] != phase:
                    phases.append(phase)
                return rotate.returncode == 0 and phase == "done" and len(phases) > 1

            wait_for(done, 30, "the root rotation through all its phases")
            new = stack.run(lambda: cp.issuer.ca.cert.serial_number)  # type: ignore[union-attr]
            issued = {n: c.serial_hex for n, c in stack.run(lambda: dict(cp.issuer.certs)).items()}
            wait_for(
                lambda: all(
                    _served_roots(stack, n) == ({issued[n]}, {format(new, "x")})
                    for n in stack.envoys
                ),
                10,
                "every Envoy holding its new-root certificate and trusting the new root only",
            )
            time.sleep(1.0 * scale)  # load on the new root alone
        finally:
            stop.set()
            peer.join(10)
        samples = load.finish(early=True)
        trusted = {n: _served_roots(stack, n)[1] for n in stack.envoys}
        return report(
            "root CA rotation",
            probes,
            samples,
            extra={
                "rotate_root_rc": rotate.returncode,
                **({"rotate_root_err": rotate.stderr[-300:]} if rotate.returncode else {}),
                "phases": phases,
                "fresh_handshakes": fresh["sent"],
                "fresh_handshakes_failed": fresh["failed"],
                "old_root_trusted_at_end": any(format(old, "x") in t for t in trusted.values()),
                "new_root_only": all(t == {format(new, "x")} for t in trusted.values()),
            },
        )


UP_MESH = """\
xds: {{host: 127.0.0.1, port: {xds}}}
gateway: {{name: gw, host: 127.0.0.1, port: {gw}, admin_port: {gw_admin}}}
services:
  - name: web
    port: 9080
    endpoints:
{endpoints}
routes:
  - {{name: open, match: {{path: {{prefix: /}}}}, to: {{service: web}}}}
"""
UP_ENDPOINT = """\
      - {{name: web-{n}, port: {app}, demo: {{}},
         sidecar: {{inbound_port: {inb}, outbound_port: {out}, admin_port: {admin}}}}}
"""


def proxies_reloaded(tmp: Path, scale: float = 1.0) -> Report:
    """``legation up``: a reload adds an endpoint with a sidecar and removes another; the new
    proxy's Envoy must start, the removed one's stop, traffic to the rest unaffected."""
    with Stack(tmp) as stack:
        kinds = ("app", "inb", "out", "admin")
        p = stack.ports(
            "xds", "gw", "gw_admin", "status", *(f"{k}{n}" for n in (1, 2, 3) for k in kinds)
        )

        def endpoints(*ns: int) -> str:
            return "".join(
                UP_ENDPOINT.format(
                    n=n, app=p[f"app{n}"], inb=p[f"inb{n}"], out=p[f"out{n}"], admin=p[f"admin{n}"]
                )
                for n in ns
            )

        mesh = stack.write("mesh.yaml", UP_MESH.format(**p, endpoints=endpoints(1, 2)))
        stack.child(
            [
                *LEGATION,
                "up",
                str(mesh),
                "--plain",
                "--status-port",
                str(p["status"]),
                "--log-dir",
                str(stack.tmp / "up-logs"),
            ],
            port=p["status"],
            name="up",
        )
        wait_for(
            lambda: all(listening(p[k]) for k in ("gw", "admin1", "admin2")), 30, "the first Envoys"
        )
        probes = [OPEN]
        load = stack.load(p["gw"], probes, duration=5 * scale)
        time.sleep(0.5 * scale)
        stack.write("mesh.yaml", UP_MESH.format(**p, endpoints=endpoints(1, 3)))
        changed_at = time.time()
        try:
            wait_for(
                lambda: listening(p["admin3"]) and not listening(p["admin2"]),
                4 * scale,
                "web-3's Envoy started and web-2's stopped",
            )
            followed = True
        except TimeoutError:
            followed = False
        samples = load.finish()
        return report(
            "proxies added/removed",
            probes,
            samples,
            restored_at=changed_at,
            extra={"envoys_followed": followed, "served_by_new": _inbound_requests(p["admin3"])},
        )


def _inbound_requests(admin_port: int) -> int:
    """Requests a sidecar's inbound listener answered (its admin stats)."""
    url = (
        f"http://127.0.0.1:{admin_port}/stats?format=json&filter="
        r"^http\.inbound.*downstream_rq_completed$"
    )
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            stats = json.loads(resp.read()).get("stats", [])
    except OSError:
        return 0
    return sum(int(s.get("value", 0)) for s in stats)


# -- soak (bench/faults.py --soak only, never in CI) ----------------------------------------


def soak(tmp: Path, minutes: float = 30.0) -> Report:
    """Steady load for ``minutes`` through a ``legation serve xds`` child (control plane and
    embedded services) with every call-out on the path; its RSS sampled every 10 s. Reported:
    RSS after warm-up (the first tenth) and at the end, and the growth between them."""
    with Stack(tmp) as stack:
        ports = stack.ports("xds", "gw", "gw_admin", "authz", "proc", "rl", "status")
        app = stack.app("web")
        _policies(stack)
        stack.write("authz.yaml", AUTHZ_YAML)
        stack.write("limits.yaml", LIMITS_YAML.format(unit="minute", limit=1_000_000))
        mesh = stack.write(
            "mesh.yaml",
            SERVICES_MESH.replace(
                "  - {{name: fragile, match: {{path: {{prefix: /fragile}}}}, "
                "to: {{service: web}},\n"
                "     filters: [{{name: fault_t}}]}}\n",
                "",
            ).format(**ports, app=app.port, tag="0", rl_mode="open", rl_store=""),
        )
        xds = stack.serve(
            "xds",
            port=ports["status"],
            args=["--config", str(mesh), "--status-port", str(ports["status"])],
        )
        stack.proxies_by_cli(mesh)
        probes = [ADMIN, DENIED, LIMITED, TAGGED]
        seconds = minutes * 60
        load = stack.load(
            ports["gw"], probes, rate=200, duration=seconds, max_requests=int(seconds * 250)
        )
        rss: list[tuple[float, int]] = []
        while time.time() < load.started_at + seconds:
            rss.append((time.time() - load.started_at, rss_kb(xds.pid)))
            time.sleep(min(10.0, max(0.0, load.started_at + seconds - time.time())))
        samples = load.finish()
        warm = (
            next(kb for t, kb in rss if t >= seconds / 10)
            if rss[-1][0] >= seconds / 10
            else rss[0][1]
        )
        end = rss[-1][1]
        return report(
            f"soak {minutes:g} min",
            probes,
            samples,
            extra={
                "rss_warm_kb": warm,
                "rss_end_kb": end,
                "rss_growth_pct": round(100 * (end - warm) / warm, 1),
            },
        )
