"""``ConfigError``, the error of a bad training configuration.

A leaf module: the config, the TRL reader, the source checks and the trainer all raise it, and none
of them has to import another to do so.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration; the message names the key and what to do."""
