"""The webui hypernetwork's architecture options, as named in its files.

A leaf (torch only): the config validates `hn.*` with `HypernetworkOptions.problems()`
without importing the hypernetwork adapter (the adapters sit above the config).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def _activations() -> dict[str, type[nn.Module] | None]:
    """The webui's table: its named ones, then every torch.nn activation by lower-cased class
    name. Left out: those that cannot work here (Threshold needs arguments, GLU halves the
    width, MultiheadAttention is no activation)."""
    table: dict[str, type[nn.Module] | None] = {
        "linear": None,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,  # the webui's "swish" is Hardswish, kept for file compatibility
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    module = torch.nn.modules.activation
    for cls_name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and cls_name not in (
            "Threshold",
            "GLU",
            "MultiheadAttention",
        ):
            table.setdefault(cls_name.lower(), cls)
    return table


ACTIVATIONS = _activations()


def default_dropout_structure(
    layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The webui's rule: 0.3 after every hidden layer but the last, which only with
    `last_layer_dropout`; never on the input or the output."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


@dataclass
class HypernetworkOptions:
    """The architecture, named as in the webui file."""

    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation_func: str | None = None
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    activate_output: bool = False
    use_dropout: bool = False
    last_layer_dropout: bool = False
    dropout_structure: list[float] | None = None  # None = derived from the two flags above

    def __post_init__(self) -> None:
        self.layer_structure = [float(x) for x in self.layer_structure]
        if self.dropout_structure is None:
            self.dropout_structure = default_dropout_structure(
                self.layer_structure, self.use_dropout, self.last_layer_dropout
            )
        self.dropout_structure = [float(x) for x in self.dropout_structure]

    def problems(self) -> list[str]:
        """What is wrong, as `key: message` lines (empty when the options are usable)."""
        out = []
        ls, ds = self.layer_structure, self.dropout_structure or []
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(x <= 0 for x in ls):
            out.append(
                f"layer_structure: must start and end with 1 and hold positive width "
                f"multipliers, e.g. [1, 2, 1]; got {ls}"
            )
        if len(ds) != len(ls) or any(not 0 <= p < 1 for p in ds):
            out.append(
                f"dropout_structure: must have one probability in [0, 1) per entry "
                f"of layer_structure {ls}; got {ds}"
            )
        if self.activation_func not in (None, *ACTIVATIONS):
            out.append(
                f"activation_func: unknown {self.activation_func!r}; one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.weight_initialization not in WEIGHT_INITS:
            out.append(
                f"weight_initialization: unknown {self.weight_initialization!r}; one "
                f"of {', '.join(WEIGHT_INITS)}"
            )
        return out
