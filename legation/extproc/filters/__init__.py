"""Built-in filters; each is registered through an entry point like any third-party filter."""
