"""The attack suite reuses the packages' harnesses (fixtures re-exported here, not copied)."""

from tests.extauthz.conftest import stack_factory

__all__ = ["stack_factory"]
