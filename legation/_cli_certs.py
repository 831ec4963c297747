"""``legation bootstrap`` (a proxy's bootstrap and xDS credential) and ``legation ca``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from legation.errors import LegationError

DEFAULT_XDS = "127.0.0.1:18000"


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from legation.certs.issuer import DEFAULT_CA_DIR, CaLocation, locate_ca
    from legation.translate.bootstrap import bootstrap

    host, _, port = args.xds.rpartition(":")
    cluster, admin_port = args.cluster, args.admin_port
    trust_domain = "cluster.local"
    where = CaLocation(DEFAULT_CA_DIR / "ca.crt", DEFAULT_CA_DIR / "ca.key", generate=True)
    if args.mesh:
        from legation.config import load_mesh

        try:
            mesh = load_mesh(args.mesh)
        except LegationError as err:
            print(err, file=sys.stderr)
            return 2
        spec = next((p for p in mesh.proxies() if p.node_id == args.node), None)
        if spec is None:
            known = ", ".join(p.node_id for p in mesh.proxies())
            print(
                f"{args.mesh}: no proxy with node id {args.node!r} (known: {known})",
                file=sys.stderr,
            )
            return 2
        cluster = cluster or spec.node_cluster
        admin_port = admin_port or spec.admin_port
        if args.xds == DEFAULT_XDS:
            host, port = mesh.xds.host, str(mesh.xds.port)
        trust_domain = mesh.mtls.trust_domain
        where = locate_ca(mesh, mesh_dir=Path(args.mesh).parent)
    if args.ca_dir:
        where = CaLocation(
            Path(args.ca_dir) / "ca.crt", Path(args.ca_dir) / "ca.key", generate=True
        )
    try:
        directory = _enrol(args, where, trust_domain)
    except LegationError as err:
        print(err, file=sys.stderr)
        return 2
    doc = bootstrap(
        node_id=args.node,
        node_cluster=cluster or "",
        xds_host=host or "127.0.0.1",
        xds_port=int(port),
        admin_port=admin_port or 9901,
        delta=args.delta,
        credentials_dir=directory.resolve(),
    )
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


def _enrol(args: argparse.Namespace, where: Any, trust_domain: str) -> Path:
    """The node's credential directory, with a current credential in it: the one there is kept
    unless ``--rotate``, it is no longer the node's current one, or it is due for renewal."""
    from datetime import UTC, datetime

    from legation.certs.enrol import (
        BOOTSTRAP_TTL,
        Enrolments,
        NodeFiles,
        enrol,
        node_dir_name,
        xds_root,
    )

    directory = (
        Path(args.credentials_dir)
        if args.credentials_dir
        else (where.nodes_dir / node_dir_name(args.node))
    )
    enrolments = Enrolments.beside(where.home)
    if not args.rotate:
        held = _held_serial(NodeFiles(directory))
        if (
            held is not None
            and held[0] == enrolments.current(args.node)
            and datetime.now(UTC) < held[1]
        ):
            print(
                f"node {args.node!r}: keeping the credential in {directory} "
                f"(--rotate issues a new one)",
                file=sys.stderr,
            )
            return directory
    ca = xds_root(where.home)  # the xDS root beside the mesh CA, never the mesh root
    cert, _ = enrol(ca, enrolments, args.node, directory, ttl=BOOTSTRAP_TTL)
    print(
        f"node {args.node!r}: new xDS credential in {directory}, serial {cert.serial_hex}, "
        f"expires {cert.not_after:%Y-%m-%d %H:%M} UTC; any earlier one is revoked",
        file=sys.stderr,
    )
    return directory


def _held_serial(files: Any) -> tuple[int, Any] | None:
    """(serial, renew-at time) of the credential in ``files``, if there is a readable one."""
    from cryptography import x509

    from legation.certs.workload import RENEW_AT

    try:
        cert = x509.load_pem_x509_certificate(files.read()[0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return cert.serial_number, start + (end - start) * RENEW_AT


def cmd_rotate_root(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from legation.certs.issuer import DEFAULT_CA_DIR, locate_ca
    from legation.certs.roots import request_rotation
    from legation.config._types import _parse_duration

    try:
        overlap = (
            timedelta(0) if args.overlap.strip() in ("0", "0s") else _parse_duration(args.overlap)
        )
    except ValueError as err:
        print(f"--overlap: {err}", file=sys.stderr)
        return 2
    try:
        if args.ca_dir:
            directory = Path(args.ca_dir)
        elif args.mesh:
            from legation.config import load_mesh

            where = locate_ca(load_mesh(Path(args.mesh)), mesh_dir=Path(args.mesh).parent)
            if not where.generate:
                print(
                    f"{args.mesh}: mtls.ca_cert/ca_key name a root of your own; "
                    "rotate-root rotates a generated CA directory (mtls.ca_dir)",
                    file=sys.stderr,
                )
                return 1
            directory = where.home
        else:
            directory = DEFAULT_CA_DIR
        state = request_rotation(directory, overlap=overlap)
    except LegationError as err:
        print(err, file=sys.stderr)
        return 1
    print(
        f"root rotation requested in {directory}: {state.old} -> {state.new}; the running "
        f"control plane trusts both, re-issues every certificate from the new root once "
        f"every proxy has the bundle, and retires the old root {overlap.total_seconds():g}s "
        f"after that (`legation status --json`: mtls.ca.rotation)"
    )
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from legation.certs.ca import CERT_FILE
    from legation.certs.pem import describe_root

    try:
        info = describe_root(Path(args.dir) / CERT_FILE)
    except LegationError as err:
        print(err, file=sys.stderr)
        return 1
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0
