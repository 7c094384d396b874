"""The drivers' error type, in a room of its own so that every module can import it.

``xai_audit.config`` (the settings) and ``xai_audit.sources`` (the input readers) both raise
:class:`ConfigError`; keeping it here means neither has to import the other for it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake, reported before any heavy work with one clear message."""
