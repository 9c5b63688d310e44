"""The webui hypernetwork itself: options, the residual MLPs, one (k, v) pair per width."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from personalize.errors import ConfigError
from personalize.hypernetwork_options import (  # noqa: F401 (re-exported)
    ACTIVATIONS,
    WEIGHT_INITS,
    HypernetworkOptions,
    default_dropout_structure,
)


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
                raise ConfigError(f"unknown weight init {weight_init!r}; one of {WEIGHT_INITS}")
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
            raise ConfigError("invalid hypernetwork options: " + "; ".join(problems))
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
