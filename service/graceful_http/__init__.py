"""graceful-http: a socket-activated HTTP service whose reloads nobody notices."""

__version__ = "0.1.0"
