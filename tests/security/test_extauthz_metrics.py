"""Metric cardinality: the ``policy`` label comes from ``context_extensions``, which any client of
the gRPC port chooses. A series per name would grow without bound; the label set is bounded to
the policies the service knows, 32 spare names, and ``other``."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from legation import plugins
from legation.extauthz.checks import ALLOW, Decision, PythonCheck
from legation.extauthz.observe import OTHER_POLICY, PolicyLabels
from legation.extauthz.request import RequestContext
from legation.extauthz.service import Settings, build_servicer, close_checks
from tests.extauthz.test_units import request


class Allow(PythonCheck):
    name = "allow"

    async def check(self, ctx: RequestContext) -> Decision:
        return ALLOW


class AllowFactory:
    name = "allow"

    def validate(self, raw: Any) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> Allow:
        return Allow()


def policy_labels(registry: CollectorRegistry, metric: str) -> set[str]:
    return {
        s.labels["policy"]
        for family in registry.collect()
        if family.name == metric
        for s in family.samples
        if "policy" in s.labels
    }


async def test_caller_chosen_policy_names_do_not_grow_the_series() -> None:
    plugins.register("extauthz.check", AllowFactory())
    try:
        registry = CollectorRegistry()
        servicer = await build_servicer(
            Settings(
                config={
                    "checks": {"allow": {"type": "allow"}},
                    "default_checks": ["allow"],
                    "default_policy": "main.authz",
                    "dry_run": ["beta.authz"],
                },
                registry=registry,
            )
        )
        for i in range(500):
            r = request("/")
            r.attributes.context_extensions["policy"] = f"attacker-{i}"
            assert (await servicer.Check(r, None)).status.code == 0
        for name in ("main.authz", "beta.authz"):
            r = request("/")
            r.attributes.context_extensions["policy"] = name
            await servicer.Check(r, None)
        labels = policy_labels(registry, "legation_extauthz_decisions")
        assert {"main.authz", "beta.authz", OTHER_POLICY} <= labels
        assert len(labels) <= 2 + 32 + 1
        assert len(policy_labels(registry, "legation_extauthz_handler_seconds")) <= 35
        total = sum(
            s.value
            for f in registry.collect()
            if f.name == "legation_extauthz_decisions"
            for s in f.samples
            if s.name.endswith("_total")
        )
        assert total == 502  # every decision still counted
        await close_checks(servicer)
    finally:
        plugins.unregister("extauthz.check", "allow")


def test_catalog_names_keep_their_own_label_after_the_spares_are_used() -> None:
    loaded = {"pkg.a"}
    labels = PolicyLabels({"known"}, [lambda: loaded], spare=2)
    assert [labels(n) for n in ("x", "y", "z", "known", "pkg.a")] == [
        "x",
        "y",
        OTHER_POLICY,
        "known",
        "pkg.a",
    ]
    loaded.add("pkg.b")  # a policy reload adds a package
    assert labels("pkg.b") == "pkg.b"
    assert labels("x") == "x" and labels("w") == OTHER_POLICY


def test_a_failing_catalog_never_breaks_labelling() -> None:
    def broken() -> set[str]:
        raise RuntimeError("store gone")

    labels = PolicyLabels((), [broken], spare=0)
    assert labels("anything") == OTHER_POLICY
