"""Hypernetworks as the AUTOMATIC1111 webui trains and stores them, on a diffusers UNet.

A hypernetwork holds, for each attention context width `d`, a pair of small residual MLPs
`(k, v)`. Every attention layer whose context has width `d` computes
`key = to_k(ctx + k.linear(ctx) * s)` and `value = to_v(ctx + v.linear(ctx) * s)` with the
query untouched (`s` is the strength). The context is the text embedding in cross-attention
and the hidden states in self-attention, so on SD1 the width 768 pair sees the prompt and
320/640/1280 the image features. No pretrained weight changes.

It is applied through attention processors: `attach` registers one `HypernetworkStack` on
the UNet (so the MLPs are UNet parameters, and accelerate/DDP, dtype casts and checkpoints
handle them like any others) and wraps each `Attention`'s processor. Widths without an
active pair, and strength 0, go through the wrapped processor untouched, so they are
bit-identical to the base model.

Files: the webui `.pt` (a pickled dict, read with `weights_only=True` only) and a
`.safetensors` layout; both are described in docs/hypernetwork.md.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.inference import ArtifactError

logger = logging.getLogger(__name__)

STACK_ATTR = "personalize_hypernetworks"
FORMAT_VERSION = "1"
# safetensors key: "<width>.<k|v>.<key of that module's state dict>", e.g. "768.k.linear.0.weight"
_SAFE_KEY = re.compile(r"^(\d+)\.([kv])\.(.+)$")
_WEBUI_OPTION_KEYS = ("layer_structure", "activation_func", "is_layer_norm",
                      "weight_initialization", "use_dropout", "dropout_structure",
                      "last_layer_dropout", "activate_output")
_WEBUI_INFO_KEYS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "optional_info")
# Early webui files named the two Linear layers linear1/linear2 (no activation in between).
_LEGACY_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
                "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
_SUPPORTED_BASE_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor")

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def _activations() -> dict[str, type[nn.Module] | None]:
    """The webui's table: its named ones, then every torch.nn activation by lower-cased class
    name. Left out: those that cannot work here (Threshold needs arguments, GLU halves the
    width, MultiheadAttention is no activation)."""
    table: dict[str, type[nn.Module] | None] = {
        "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
        "swish": nn.Hardswish,  # the webui's "swish" is Hardswish, kept for file compatibility
        "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    }
    module = torch.nn.modules.activation
    for cls_name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and cls_name not in (
                "Threshold", "GLU", "MultiheadAttention"):
            table.setdefault(cls_name.lower(), cls)
    return table


ACTIVATIONS = _activations()


def default_dropout_structure(layer_structure: list[float], use_dropout: bool,
                              last_layer_dropout: bool) -> list[float]:
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
                self.layer_structure, self.use_dropout, self.last_layer_dropout)
        self.dropout_structure = [float(x) for x in self.dropout_structure]

    def problems(self) -> list[str]:
        """What is wrong, as `key: message` lines (empty when the options are usable)."""
        out = []
        ls, ds = self.layer_structure, self.dropout_structure or []
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or any(x <= 0 for x in ls):
            out.append(f"layer_structure: must start and end with 1 and hold positive width "
                       f"multipliers, e.g. [1, 2, 1]; got {ls}")
        if len(ds) != len(ls) or any(not 0 <= p < 1 for p in ds):
            out.append(f"dropout_structure: must have one probability in [0, 1) per entry "
                       f"of layer_structure {ls}; got {ds}")
        if self.activation_func not in (None, *ACTIVATIONS):
            out.append(f"activation_func: unknown {self.activation_func!r}; one of "
                       f"{', '.join(ACTIVATIONS)}")
        if self.weight_initialization not in WEIGHT_INITS:
            out.append(f"weight_initialization: unknown {self.weight_initialization!r}; one "
                       f"of {', '.join(WEIGHT_INITS)}")
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

    def __init__(self, widths: list[int], options: HypernetworkOptions | None = None,
                 name: str = "hypernetwork", step: int = 0, sd_checkpoint: str | None = None,
                 sd_checkpoint_name: str | None = None, optional_info: str | None = None):
        super().__init__()
        self.options = options or HypernetworkOptions()
        problems = self.options.problems()
        if problems:
            raise ValueError("invalid hypernetwork options: " + "; ".join(problems))
        self.layers = nn.ModuleDict({str(int(w)): HypernetworkPair(int(w), self.options)
                                     for w in widths})
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
        fields["last_layer_dropout"] = bool(o.dropout_structure[-2] != 0) \
            if len(o.dropout_structure) >= 2 else o.last_layer_dropout
        fields["use_dropout"] = bool(o.use_dropout or any(o.dropout_structure))
        fields.update(name=self.name, step=int(self.step), sd_checkpoint=self.sd_checkpoint,
                      sd_checkpoint_name=self.sd_checkpoint_name,
                      optional_info=self.optional_info)
        return fields

    def module_state_dicts(self) -> dict[int, tuple[dict[str, torch.Tensor], ...]]:
        return {int(w): tuple({k: t.detach().cpu().clone() for k, t in m.state_dict().items()}
                              for m in (p.k, p.v))
                for w, p in self.layers.items()}


# ------------------------------------------------------------------------------ files


def save_hypernetwork(hn: Hypernetwork, path: str | Path) -> Path:
    """Write `hn` as a webui `.pt` or as `.safetensors`, chosen by the suffix (atomically)."""
    from personalize.adapters.formats import atomic_save_safetensors, atomic_torch_save

    path = Path(path)
    if path.suffix == ".pt":
        data: dict[Any, Any] = dict(hn.module_state_dicts())
        data.update(hn.file_fields())
        return atomic_torch_save(data, path)
    if path.suffix == ".safetensors":
        tensors = {f"{w}.{kv}.{key}": t.float().contiguous()
                   for w, pair in hn.module_state_dicts().items()
                   for kv, sd in zip("kv", pair) for key, t in sd.items()}
        metadata = {"personalize_artifact": "hypernetwork",
                    "hypernetwork_format_version": FORMAT_VERSION,
                    "hypernetwork_options": json.dumps(hn.file_fields()),
                    "hypernetwork_widths": json.dumps(hn.widths)}
        return atomic_save_safetensors(tensors, path, metadata)
    raise ValueError(f"{path}: a hypernetwork is saved as .pt (webui) or .safetensors")


def _torch_load(path: Path, peek: bool = False) -> Any:
    """torch.load with weights_only=True; a file that needs code to unpickle is refused."""
    # Peeking (for detection) memory-maps zip-format files, so it reads almost nothing.
    mmap = peek and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch puts the reason on the lines after "WeightsUnpickler error:", when it has one.
        text = str(e).split("WeightsUnpickler error:", 1)[-1]
        detail = next((line.strip() for line in text.splitlines() if line.strip()),
                      type(e).__name__)[:200]
        if not re.search(r"global|reduce|build|new object", detail, re.IGNORECASE):
            raise ArtifactError(f"{path}: not a readable PyTorch file (damaged, or not "
                                f"written by torch.save): {detail}") from e
        raise ArtifactError(
            f"{path}: refused to load. This pickle file asks to run code or build objects "
            f"that a hypernetwork never contains ({detail[:200]}). personalize reads .pt "
            "files with torch.load(weights_only=True) only, because unpickling can run "
            "arbitrary code. Get the file from a source you trust, or as .safetensors."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        detail = str(e).strip() or f"{type(e).__name__}, the file is empty or cut short"
        raise ArtifactError(f"{path}: not a readable PyTorch file: {detail}") from e


def _is_webui_dict(obj: Any) -> bool:
    """Integer width keys holding (k, v) pairs, or the webui's option keys. Loose on purpose:
    a damaged hypernetwork should reach the loader's precise error, not "unknown kind"."""
    if not isinstance(obj, dict) or "string_to_param" in obj:
        return False
    if any(isinstance(k, int) and isinstance(v, (tuple, list)) for k, v in obj.items()):
        return True
    return any(isinstance(k, int) for k in obj) and "layer_structure" in obj


def _safetensors_info(path: Path) -> tuple[dict[str, str], list[str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ArtifactError(f"{path}: not a readable .safetensors file: {e}") from e


def _is_hypernetwork_safetensors(path: Path) -> bool:
    meta, keys = _safetensors_info(path)
    if meta.get("personalize_artifact") == "hypernetwork":
        return True
    return bool(keys) and all(_SAFE_KEY.match(k) for k in keys)


def find_hypernetwork_file(path: str | Path) -> Path | None:
    """The hypernetwork file at `path` (a file, or a training output folder), or None.
    A folder's .safetensors is preferred to its .pt: it needs no unpickling."""
    path = Path(path)
    if path.is_dir():
        for candidate in sorted(path.glob("*.safetensors")):
            if _is_hypernetwork_safetensors(candidate):
                return candidate
        for candidate in sorted(path.glob("*.pt")):
            if find_hypernetwork_file(candidate):
                return candidate
        return None
    if path.suffix == ".safetensors":
        return path if _is_hypernetwork_safetensors(path) else None
    if path.suffix in (".pt", ".pth"):
        return path if _is_webui_dict(_torch_load(path, peek=True)) else None
    return None


def _read_raw(path: Path) -> dict[Any, Any]:
    """Either format as the webui's dict: {width: (k_state, v_state), option: value, ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta, _ = _safetensors_info(path)
        raw: dict[Any, Any] = {}
        for key, tensor in load_file(str(path)).items():
            m = _SAFE_KEY.match(key)
            if not m:
                raise ArtifactError(f"{path}: key {key!r} is not <width>.<k|v>.<module key>")
            width, kv, rest = int(m.group(1)), m.group(2), m.group(3)
            raw.setdefault(width, ({}, {}))[0 if kv == "k" else 1][rest] = tensor
        try:
            raw.update(json.loads(meta.get("hypernetwork_options", "{}")))
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: metadata hypernetwork_options is not JSON: {e}") from e
        return raw
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: a webui hypernetwork file holds a dict, got "
                            f"{type(obj).__name__}")
    return obj


def hypernetwork_from_dict(raw: dict[Any, Any], source: str = "<dict>") -> Hypernetwork:
    """Build a Hypernetwork from a webui-layout dict, with the webui's defaults for missing
    options (notably activate_output=True: files older than that option had it on)."""
    sizes = {k: v for k, v in raw.items() if isinstance(k, int)}
    if not sizes:
        raise ArtifactError(f"{source}: no hypernetwork modules (integer width keys such as "
                            "768 mapping to a (k, v) pair of state dicts)")
    try:
        options = HypernetworkOptions(
            layer_structure=list(raw.get("layer_structure") or [1, 2, 1]),
            activation_func=raw.get("activation_func"),
            is_layer_norm=bool(raw.get("is_layer_norm", False)),
            weight_initialization=raw.get("weight_initialization") or "Normal",
            activate_output=bool(raw.get("activate_output", True)),
            use_dropout=bool(raw.get("use_dropout", False)),
            last_layer_dropout=bool(raw.get("last_layer_dropout", False)),
            dropout_structure=raw.get("dropout_structure"),
        )
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{source}: malformed hypernetwork options: {e}") from e
    # The webui treats a file with any dropout in its structure as using dropout.
    options.use_dropout = options.use_dropout or any(options.dropout_structure)
    problems = options.problems()
    if problems:
        raise ArtifactError(f"{source}: " + "; ".join(problems))
    name = raw.get("name") or Path(source).stem
    hn = Hypernetwork(sorted(sizes), options, name=str(name), step=int(raw.get("step") or 0),
                      sd_checkpoint=raw.get("sd_checkpoint"),
                      sd_checkpoint_name=raw.get("sd_checkpoint_name"),
                      optional_info=raw.get("optional_info"))
    for width, pair in sizes.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(sd, dict) for sd in pair)):
            raise ArtifactError(f"{source}: width {width} must map to a (k, v) pair of state "
                                f"dicts, got {type(pair).__name__}")
        for kv, sd in zip("kv", pair):
            _load_module(getattr(hn.pair(width), kv), sd, f"{source}: width {width} {kv}",
                         options)
    return hn


def _load_module(module: HypernetworkModule, state: dict[str, Any], where: str,
                 options: HypernetworkOptions) -> None:
    state = {_LEGACY_KEYS.get(k, k): v for k, v in state.items()}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected))
             if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ArtifactError(
            f"{where}: weights do not fit the architecture its options describe "
            f"(layer_structure={options.layer_structure}, activation_func="
            f"{options.activation_func!r}, is_layer_norm={options.is_layer_norm}, "
            f"activate_output={options.activate_output}, dropout_structure="
            f"{options.dropout_structure}): missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}. The file is damaged or its options do not match its weights."
        )
    module.load_state_dict({k: v.float() for k, v in state.items()})


def read_hypernetwork(path: str | Path) -> Hypernetwork:
    """Load a webui `.pt` or our `.safetensors` (or the one in a training output folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"hypernetwork file {path} does not exist")
    file = find_hypernetwork_file(path)
    if file is None:
        raise ArtifactError(f"{path} is not a hypernetwork (.pt in the webui layout or "
                            ".safetensors with <width>.<k|v>.linear.<j> keys)")
    return hypernetwork_from_dict(_read_raw(file), str(file))


def convert_hypernetwork(src: str | Path, dst: str | Path) -> Path:
    """Re-save a hypernetwork in the format of `dst`'s suffix (.pt <-> .safetensors)."""
    return save_hypernetwork(read_hypernetwork(src), dst)


# ------------------------------------------------------------------------------ the UNet


def attention_widths(unet: nn.Module) -> dict[int, list[str]]:
    """Context width -> names of the Attention modules whose keys/values read that width."""
    from diffusers.models.attention_processor import Attention

    out: dict[int, list[str]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            out.setdefault(int(module.to_k.in_features), []).append(name)
    return dict(sorted(out.items()))


def check_widths(widths: list[int], unet: nn.Module, where: str, strict: bool = True) -> None:
    """Raise when hypernetwork widths have no attention of that width in `unet` (all of them,
    or with strict=False only when none matches): a file for another base model otherwise
    loads and silently does nothing."""
    have = attention_widths(unet)
    missing = sorted(set(widths) - set(have))
    if missing and (strict or not set(widths) & set(have)):
        text = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
        raise ArtifactError(
            f"{where}: widths {missing} have no attention layer of that width in this UNet. "
            f"Its attention context widths are {sorted(have)} (text context width {text}; "
            "the webui's 768 is the SD1 text width, 1024 SD2's). Use a hypernetwork made for "
            "this base model" + (", or pass strict=False to ignore the extra widths"
                                 if set(widths) & set(have) else "") + ".")


class HypernetworkStack(nn.Module):
    """The hypernetworks on one UNet, applied in order (as the webui chains them), each with
    its strength. Registered once on the UNet, so its parameters are the UNet's."""

    def __init__(self):
        super().__init__()
        self.networks = nn.ModuleDict()
        self.strengths: dict[str, float] = {}

    def active(self, width: int) -> list[tuple[HypernetworkPair, float]]:
        out = []
        for name, hn in self.networks.items():
            pair, strength = hn.pair(width), self.strengths.get(name, 1.0)
            if pair is not None and strength != 0:
                out.append((pair, strength))
        return out


class HypernetworkAttnProcessor(nn.Module):
    """Wraps an Attention's processor: with an active pair for this layer's context width it
    computes attention itself (SDPA, or xformers when the wrapped one did), feeding the
    transformed contexts to to_k/to_v; otherwise it calls the wrapped processor unchanged."""

    def __init__(self, base_processor: Any, width: int, stack: HypernetworkStack):
        super().__init__()
        self.base_processor = base_processor  # registered as a submodule if it is one
        self.width = width
        self.xformers_op = getattr(base_processor, "attention_op", None)
        self.use_xformers = type(base_processor).__name__ == "XFormersAttnProcessor"
        # Not a submodule: the stack is registered once on the UNet, and a submodule here
        # would repeat all its weights in every processor's state dict.
        object.__setattr__(self, "stack", stack)

    def forward(self, attn, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                *args, **kwargs) -> torch.Tensor:
        active = self.stack.active(self.width)
        if not active:
            return self.base_processor(attn, hidden_states, encoder_hidden_states,
                                       attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, key_tokens, _ = (hidden_states.shape if encoder_hidden_states is None
                                     else encoder_hidden_states.shape)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        context_k, context_v = context, context
        for pair, strength in active:
            context_k = _run(pair.k, context_k, strength)
            context_v = _run(pair.v, context_v, strength)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        if self.use_xformers:
            hidden_states = self._xformers(attn, query, key, value, attention_mask,
                                           key_tokens, batch_size)
        else:
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens,
                                                             batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                     attention_mask.shape[-1])
            head_dim = key.shape[-1] // attn.heads
            query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                                 for t in (query, key, value))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1,
                                                                  attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _xformers(self, attn, query, key, value, attention_mask, key_tokens, batch_size):
        import xformers.ops

        attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
        if attention_mask is not None:
            # xformers does not broadcast the singleton query dimension of the bias.
            attention_mask = attention_mask.expand(-1, query.shape[1], -1)
        query, key, value = (attn.head_to_batch_dim(t).contiguous() for t in (query, key, value))
        out = xformers.ops.memory_efficient_attention(query, key, value, attn_bias=attention_mask,
                                                      op=self.xformers_op, scale=attn.scale)
        return attn.batch_to_head_dim(out.to(query.dtype))


def _run(module: HypernetworkModule, x: torch.Tensor, strength: float) -> torch.Tensor:
    # The MLPs keep their own dtype (fp32 unless the whole UNet was cast): like the webui,
    # compute them in it and hand the result back in the attention's dtype.
    dtype = module.linear[0].weight.dtype
    return module(x.to(dtype), strength).to(x.dtype)


def attach(unet: nn.Module, hn: Hypernetwork, strength: float = 1.0,
           name: str | None = None) -> HypernetworkStack:
    """Add `hn` to `unet`'s hypernetworks (replacing one of the same name), installing the
    processors on first use. Its parameters become UNet parameters."""
    from diffusers.models.attention_processor import Attention

    key = re.sub(r"[^0-9A-Za-z_-]", "_", name or hn.name or "hypernetwork")
    stack = getattr(unet, STACK_ATTR, None)
    if stack is None:
        attns = [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention)]
        unsupported = [f"{n} ({type(m.processor).__name__})" for n, m in attns
                       if type(m.processor).__name__ not in _SUPPORTED_BASE_PROCESSORS]
        if unsupported:
            raise ArtifactError(
                f"hypernetworks wrap the standard attention processors "
                f"({', '.join(_SUPPORTED_BASE_PROCESSORS)}); these layers use others: "
                f"{unsupported[:4]}. Load the hypernetwork before enabling other processors.")
        stack = HypernetworkStack()
        unet.add_module(STACK_ATTR, stack)
        for _, module in attns:
            module.set_processor(HypernetworkAttnProcessor(
                module.processor, int(module.to_k.in_features), stack))
    device = next(unet.parameters()).device
    stack.networks[key] = hn.to(device)
    stack.strengths[key] = float(strength)
    return stack


def set_strength(unet: nn.Module, strength: float, name: str | None = None) -> None:
    """Change the strength of one hypernetwork (by name) or of all of them."""
    stack = getattr(unet, STACK_ATTR, None)
    if stack is None:
        raise ValueError("this UNet has no hypernetwork loaded")
    for key in stack.strengths:
        if name is None or key == name:
            stack.strengths[key] = float(strength)


def remove_hypernetworks(unet: nn.Module) -> None:
    """Detach every hypernetwork and restore the processors that were there before."""
    from diffusers.models.attention_processor import Attention

    if getattr(unet, STACK_ATTR, None) is None:
        return
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor,
                                                        HypernetworkAttnProcessor):
            module.set_processor(module.processor.base_processor)
    delattr(unet, STACK_ATTR)


def load_into_pipeline(pipe, path: str | Path, strength: float = 1.0, name: str | None = None,
                       strict: bool = True) -> Hypernetwork:
    """Read a hypernetwork file and apply it to `pipe.unet` (or a bare UNet) at `strength`."""
    unet = getattr(pipe, "unet", pipe)
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength}")
    hn = read_hypernetwork(path)
    check_widths(hn.widths, unet, str(path), strict=strict)
    hn.requires_grad_(False).eval()
    attach(unet, hn, strength, name=name or hn.name)
    logger.info("hypernetwork %s (widths %s, step %d) applied at strength %s",
                hn.name, hn.widths, hn.step, strength)
    return hn
