"""Fixtures of the alert tests: the stand-ins of :mod:`.stand_ins`.

The stand-ins live in a module of their own so that other test folders
(the REST API's) can use them too.
"""

from __future__ import annotations

from tests.server.alerts.stand_ins import http_stand_in, pki, smtp_server

__all__ = ["http_stand_in", "pki", "smtp_server"]
