"""Golden metrics: Envoy's access-log service, a sliding-window aggregator, Prometheus, `top`."""

__all__ = ["aggregator", "als", "envoy_config", "names", "prometheus", "render", "window"]
