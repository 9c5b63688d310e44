"""Personalization methods: each answers what trains, what joins the loss, what is saved."""

from personalize.methods.base import Method, StepOutputs, get_method

__all__ = ["Method", "StepOutputs", "get_method"]
