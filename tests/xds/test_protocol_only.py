"""``legation.xds`` is the protocol only: none of its modules imports a domain package.

The mesh -> Envoy translation is :mod:`legation.translate`, the certificate-based authenticator
:mod:`legation.certs.xds_auth`; the protocol package must not reach back into either, nor into
the config or the request-path services.
"""

from __future__ import annotations

import ast
from pathlib import Path

import legation.xds

XDS = Path(legation.xds.__file__).parent
DOMAIN = (
    "legation.config",
    "legation.certs",
    "legation.extauthz",
    "legation.extproc",
    "legation.ratelimit",
    "legation.services",
    "legation.translate",
    "legation.controlplane",
)


def _imported(tree: ast.AST) -> list[str]:
    """Every module an ``import`` or ``from ... import`` names, at any depth (lazy imports too).
    ``from legation import certs`` counts as ``legation.certs``."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not used in this project"
            module = node.module or ""
            out.append(module)
            out += [f"{module}.{alias.name}" for alias in node.names]
    return out


def _is_domain(module: str) -> bool:
    return any(module == d or module.startswith(d + ".") for d in DOMAIN)


def test_xds_imports_nothing_of_the_domain() -> None:
    files = sorted(XDS.glob("*.py"))
    assert {f.name for f in files} >= {"server.py", "snapshot.py", "cache.py", "types.py"}
    offending = {
        f"{f.name}: {module}"
        for f in files
        for module in _imported(ast.parse(f.read_text(), str(f)))
        if _is_domain(module)
    }
    assert not offending, sorted(offending)


def test_the_check_sees_a_domain_import() -> None:
    tree = ast.parse("def f():\n    from legation import certs\n    import legation.config.model\n")
    assert [m for m in _imported(tree) if _is_domain(m)] == [
        "legation.certs",
        "legation.config.model",
    ]
