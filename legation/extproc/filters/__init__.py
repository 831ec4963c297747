"""Built-in filters; each is registered through an entry point like any third-party filter."""

__all__ = ["body_redact", "header_route", "headers", "request_id"]
