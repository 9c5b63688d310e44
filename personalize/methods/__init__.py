"""Personalization methods: each answers what trains, what joins the loss, what is saved.

A method is a module `personalize/methods/<name>.py` with a `Method` subclass whose
`name = "<name>"`; `method_names()` lists them (read from the files, nothing imported) and
`get_method(name)` imports only that one module.
"""

from personalize.config import method_names
from personalize.methods.base import Method, StepOutputs, get_method

__all__ = ["Method", "StepOutputs", "get_method", "method_names"]
