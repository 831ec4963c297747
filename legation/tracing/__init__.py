"""Distributed tracing: Legation's spans (OpenTelemetry SDK), the embedded OTLP receiver and its
bounded store, and the waterfall `legation traces` prints. Envoy's side is in
:mod:`legation.translate._tracing`; the mesh block in :mod:`legation.config.tracing`."""
