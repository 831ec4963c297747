"""Golden metrics: Envoy's access-log service, a sliding-window aggregator, Prometheus, `top`."""
