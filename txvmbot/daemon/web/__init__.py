"""The daemon's web status page: what runs where, what failed, failures
grouped by their environment facts, live (server-sent events), plus
``/metrics`` for Prometheus. Off unless ``[daemon] web`` names listeners."""

from txvmbot.daemon.web.resources import EventHub, WebUI

__all__ = ["EventHub", "WebUI"]
