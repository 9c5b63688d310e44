"""The webui hypernetwork itself: options, the residual MLPs, one (k, v) pair per width."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

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


class HypernetworkModule(nn.Module):
    """One residual MLP: `x + linear(x) * multiplier`. The layer order inside `linear`
    (Linear, activation, LayerNorm, Dropout per step) is the webui's, so its state-dict keys
    `linear.<j>.weight` match the webui's files."""

    def __init__(self, dim: int, options: HypernetworkOptions):
        super().__init__()
        ls, ds, act = options.layer_structure, options.dropout_structure, options.activation_func
        layers: list[nn.Module] = []
        for i in range(len(ls) - 1):
            width = int(dim * ls[i + 1])
            layers.append(nn.Linear(int(dim * ls[i]), width))
            is_output = i == len(ls) - 2
            if act not in (None, "linear") and (options.activate_output or not is_output):
                layers.append(ACTIVATIONS[act]())
            if options.is_layer_norm:
                layers.append(nn.LayerNorm(width))
            if ds[i + 1] > 0:
                layers.append(nn.Dropout(p=ds[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.reset_parameters(options.weight_initialization, act)

    @torch.no_grad()
    def reset_parameters(self, weight_init: str, activation: str | None) -> None:
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                continue
            # As in the webui, LayerNorm is always initialized like "Normal" (weight ~N(0, 0.01)).
            if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(layer.weight)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(layer.weight)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
            elif weight_init == "KaimingNormal":
                nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
            else:
                raise ValueError(f"unknown weight init {weight_init!r}; one of {WEIGHT_INITS}")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * multiplier


class HypernetworkPair(nn.Module):
    """The (key, value) pair of MLPs for one context width."""

    def __init__(self, dim: int, options: HypernetworkOptions):
        super().__init__()
        self.k = HypernetworkModule(dim, options)
        self.v = HypernetworkModule(dim, options)


class Hypernetwork(nn.Module):
    """Pairs for each width, the architecture options and the webui's bookkeeping fields."""

    def __init__(
        self,
        widths: list[int],
        options: HypernetworkOptions | None = None,
        name: str = "hypernetwork",
        step: int = 0,
        sd_checkpoint: str | None = None,
        sd_checkpoint_name: str | None = None,
        optional_info: str | None = None,
    ):
        super().__init__()
        self.options = options or HypernetworkOptions()
        problems = self.options.problems()
        if problems:
            raise ValueError("invalid hypernetwork options: " + "; ".join(problems))
        self.layers = nn.ModuleDict(
            {str(int(w)): HypernetworkPair(int(w), self.options) for w in widths}
        )
        self.name, self.step = name, step
        self.sd_checkpoint, self.sd_checkpoint_name = sd_checkpoint, sd_checkpoint_name
        self.optional_info = optional_info

    @property
    def widths(self) -> list[int]:
        return sorted(int(w) for w in self.layers)

    def pair(self, width: int) -> HypernetworkPair | None:
        return self.layers[str(width)] if str(width) in self.layers else None

    def file_fields(self) -> dict[str, Any]:
        """Options and bookkeeping under the webui's key names."""
        o = self.options
        fields = asdict(o)
        # The webui derives last_layer_dropout from the structure when saving; do the same.
        fields["last_layer_dropout"] = (
            bool(o.dropout_structure[-2] != 0)
            if len(o.dropout_structure) >= 2
            else o.last_layer_dropout
        )
        fields["use_dropout"] = bool(o.use_dropout or any(o.dropout_structure))
        fields.update(
            name=self.name,
            step=int(self.step),
            sd_checkpoint=self.sd_checkpoint,
            sd_checkpoint_name=self.sd_checkpoint_name,
            optional_info=self.optional_info,
        )
        return fields

    def module_state_dicts(self) -> dict[int, tuple[dict[str, torch.Tensor], ...]]:
        return {
            int(w): tuple(
                {k: t.detach().cpu().clone() for k, t in m.state_dict().items()} for m in (p.k, p.v)
            )
            for w, p in self.layers.items()
        }
