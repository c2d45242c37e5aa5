"""Runs graceful-http for its tests and its benchmark: under real systemd booted in a container, and as
plain processes on this machine."""
