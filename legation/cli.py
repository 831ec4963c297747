"""The ``legation`` command.

legation up [MESH]                  the quickstart (or MESH): control plane, Envoys, demo apps
legation check MESH...              validate mesh files without running anything
legation bootstrap --node NAME      print an Envoy bootstrap pointing at the xDS server
legation status [--json]            proxies of a running stack, ACKed versions, NACKs
legation top [--once]               golden metrics live: per route, service pair, proxy
legation traces [--route R] [--id ID]  recent traces (embedded receiver) as waterfalls
legation serve SERVICE              one service alone: xds, extauthz, extproc, ratelimit,
                                    accesslog
legation policy test DIR            run Rego unit tests, reported like `opa test`
legation demo --name N --port P     one demo app (the compose stack runs them this way)
legation ca show [DIR]              the mesh CA's root: fingerprint and expiry
legation ca rotate-root             a new mesh root, phased in by the running control plane
legation explain [ROUTE]            per route: services called, HTTP or gRPC, hops, and why
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from legation._cli_certs import DEFAULT_XDS, cmd_bootstrap, cmd_ca, cmd_rotate_root
from legation._cli_demo import add_parser as add_demo
from legation._cli_serve import cmd_serve, loop_refused
from legation._cli_status import cmd_status
from legation._cli_traces import add_parser as add_traces
from legation.errors import LegationError

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

DEFAULT_STATUS = "http://127.0.0.1:18001"


def _quickstart() -> Path:
    local = Path("examples/quickstart/mesh.yaml")
    if local.is_file():
        return local
    from legation.up import QUICKSTART

    return QUICKSTART


def cmd_up(args: argparse.Namespace) -> int:
    from legation.up import Stack

    if loop_refused("legation up"):  # its `legation serve` children would, once it had started
        return 2
    mesh = Path(args.mesh) if args.mesh else _quickstart()
    stack = Stack(
        mesh,
        delta=args.delta,
        status_port=args.status_port,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        live=False if args.plain else None,
        ebpf=args.ebpf,
        capture=args.capture,
    )
    return asyncio.run(stack.run())


def cmd_check(args: argparse.Namespace) -> int:
    from legation.config import load_mesh
    from legation.controlplane import DEFAULT_STATUS_PORT
    from legation.services.planning import plan
    from legation.translate import translate

    failed = 0
    for path in args.mesh:
        try:
            mesh = load_mesh(path)
            # the request-path services' own files (policies, limits, chains) are checked too
            plan(mesh, mesh_path=path, reserved={DEFAULT_STATUS_PORT: "the status endpoint's"})
            snapshots = translate(mesh, version="check")
        except LegationError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        routes = len(mesh.routes)
        print(
            f"{path}: ok ({len(mesh.services)} services, {routes} routes, "
            f"{len(snapshots)} proxies, {sum(len(s) for s in snapshots.values())} resources)"
        )
    return 1 if failed else 0


def cmd_policy(args: argparse.Namespace) -> int:
    from legation.extauthz.policy_test import main as policy_test

    return int(policy_test(args.argv))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="legation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a mesh locally (default: the quickstart)")
    up.add_argument("mesh", nargs="?", help="mesh file (default examples/quickstart/mesh.yaml)")
    up.add_argument("--delta", action="store_true", help="Envoys use delta (incremental) ADS")
    up.add_argument("--status-port", type=int, default=18001)
    up.add_argument("--log-dir", help="where Envoy logs go (default .legation/logs)")
    up.add_argument("--plain", action="store_true", help="log lines instead of a live table")
    up.add_argument(
        "--ebpf",
        action="store_true",
        help="splice same-host sockets of the mesh's processes with sockops + sk_msg (root, clang, "
        "bpftool; attached only to a cgroup this run creates)",
    )
    up.add_argument(
        "--capture",
        action="store_true",
        help="each app and its sidecar in a network namespace, traffic captured (needs root)",
    )
    up.set_defaults(fn=cmd_up)

    check = sub.add_parser("check", help="validate mesh files")
    check.add_argument("mesh", nargs="+")
    check.set_defaults(fn=cmd_check)

    boot = sub.add_parser(
        "bootstrap",
        help="enrol a node (its xDS credential, written to files) and print its Envoy bootstrap",
    )
    boot.add_argument("--node", required=True, help="node id (e.g. gateway-ingress)")
    boot.add_argument("--cluster", default="", help="node cluster (default: from --mesh, or node)")
    boot.add_argument("--xds", default=DEFAULT_XDS, help="xDS server host:port")
    boot.add_argument("--admin-port", type=int, default=0)
    boot.add_argument("--mesh", help="take cluster, admin port and xDS address from this mesh")
    boot.add_argument("--delta", action="store_true", help="use delta (incremental) ADS")
    boot.add_argument("--json", action="store_true")
    boot.add_argument(
        "--credentials-dir",
        help="where the node's xDS credential is written (default: next to the "
        "CA, .legation/nodes/NODE); the bootstrap points Envoy at it",
    )
    boot.add_argument(
        "--ca-dir",
        help="the CA directory (default: from --mesh, else .legation/ca, created on first use)",
    )
    boot.add_argument(
        "--rotate",
        action="store_true",
        help="issue a new credential even if a current one is there (revokes it)",
    )
    boot.set_defaults(fn=cmd_bootstrap)

    status = sub.add_parser("status", help="status of a running stack")
    status.add_argument("--url", default=DEFAULT_STATUS)
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)
    from legation._cli_top import add_parser as add_top

    add_top(sub, default_url=DEFAULT_STATUS)
    add_traces(sub, DEFAULT_STATUS)

    serve = sub.add_parser("serve", help="run one service")
    ssub = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    xds = ssub.add_parser("xds", help="the control plane (xDS, status, the embedded services)")
    xds.add_argument("--config", help="the mesh file")
    xds.add_argument("--listen", help="host:port (default: from the mesh)")
    xds.add_argument("--status-port", type=int, default=18001, help="status endpoint")
    xds.add_argument(
        "--status-host", default="127.0.0.1", help="status endpoint's address (compose: 0.0.0.0)"
    )
    xds.add_argument(
        "--services-dir",
        help="publish the request-path services' plans here for their own "
        "processes (`legation serve KIND --plan DIR/KIND/plan.json`) instead of "
        "running them in this one",
    )
    xds.add_argument("--processes-file", help=argparse.SUPPRESS)  # written by `legation up`
    xds.add_argument(
        "--capture", action="store_true", help="translate for transparent capture (as `up`)"
    )
    xds.set_defaults(fn=cmd_serve)
    from legation.services import KINDS

    for kind in KINDS:
        one = ssub.add_parser(kind.name, help=kind.help)
        one.add_argument("--config", help="the service's own config file")
        one.add_argument(
            "--plan",
            help="follow the plan a control plane publishes "
            "(`serve xds --services-dir`) instead of --config",
        )
        one.add_argument("--listen", help="host:port (default 127.0.0.1, an ephemeral port)")
        one.add_argument(
            "--workers",
            type=int,
            default=1,
            help="processes: worker i on port + 100 i (list each in Envoy's cluster)",
        )
        one.add_argument(
            "--reuse-port",
            action="store_true",
            help="the workers share one port (SO_REUSEPORT; Envoy may use only one of them)",
        )
        one.add_argument("--worker", type=int, default=0, help="with --plan: which worker")
        one.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="serve Prometheus metrics here (with --workers: the workers' merged)",
        )
        kind.service_class().add_cli_options(one)
        one.set_defaults(fn=cmd_serve)

    add_demo(sub)

    ca = sub.add_parser("ca", help="the mesh certificate authority (mtls)")
    csub = ca.add_subparsers(dest="ca_command", required=True)
    show = csub.add_parser("show", help="print the root's fingerprint and expiry")
    show.add_argument(
        "dir",
        nargs="?",
        default=".legation/ca",
        help="the CA directory (default .legation/ca, where `legation up` keeps it)",
    )
    show.set_defaults(fn=cmd_ca)
    rotate = csub.add_parser(
        "rotate-root",
        help="generate a new mesh root; the running control "
        "plane trusts both, moves every certificate over, retires the old",
    )
    rotate.add_argument(
        "--ca-dir", help="the CA directory (default: from --mesh, else .legation/ca)"
    )
    rotate.add_argument("--mesh", help="find the CA directory from this mesh (mtls.ca_dir)")
    rotate.add_argument(
        "--overlap",
        default="60s",
        help="how long the old root stays trusted "
        "once every certificate comes from the new one (default 60s)",
    )
    rotate.set_defaults(fn=cmd_rotate_root)

    policy = sub.add_parser("policy", help="Rego policy tools")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    # every argument (-v, --coverage, -r, --help...) goes to policy_test.main's own parser
    ptest = psub.add_parser(
        "test", help="run the Rego unit tests like `opa test`", prefix_chars="+", add_help=False
    )
    ptest.add_argument("argv", nargs=argparse.REMAINDER)
    ptest.set_defaults(fn=cmd_policy)
    from legation.explain import add_parser as add_explain

    add_explain(sub, default_mesh=_quickstart)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
