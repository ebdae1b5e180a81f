"""Errors raised by `strata plan`. All derive from PlanError, which the CLI turns into a one-line message."""
from __future__ import annotations


class PlanError(ValueError):
    """Bad input to the planner: the message says what is wrong and how to fix it."""


class UnknownGPUError(PlanError):
    pass


class UnknownModelError(PlanError):
    pass


class ConfigError(PlanError):
    """A model config.json without the fields the planner needs (or with values it cannot use)."""


class LayoutError(PlanError):
    """A requested layout that the GPU count cannot be divided into."""
