"""Components a config section chooses by ``kind``: a class registered under that name, whose dataclass
fields are keys of the section too, built once by the config loader (run/config.py ``_build``) into the
object the run calls.

Why one mechanism: a backend or an objective with settings is then one file (its class, registered
here), and its keys are checked, documented and overridden as every other key.
"""
from __future__ import annotations


def registry(table: dict[str, type]):
    """A decorator factory that registers a class under a kind in ``table`` (and sets its ``kind``)."""
    def kind(name: str):
        def register(cls):
            table[name] = cls
            cls.kind = name
            return cls
        return register
    return kind
