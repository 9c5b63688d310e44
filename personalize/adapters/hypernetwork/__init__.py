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

network.py holds the MLPs, unet.py the processors and `attach`, files.py the files: the webui
`.pt` (a pickled dict, read with `weights_only=True` only) and a `.safetensors` layout, both
described in docs/hypernetwork.md.
"""

from personalize.adapters.hypernetwork.files import (
    FORMAT_VERSION,
    convert_hypernetwork,
    find_hypernetwork_file,
    hypernetwork_from_dict,
    read_hypernetwork,
    save_hypernetwork,
)
from personalize.adapters.hypernetwork.network import (
    ACTIVATIONS,
    WEIGHT_INITS,
    Hypernetwork,
    HypernetworkModule,
    HypernetworkOptions,
    HypernetworkPair,
    default_dropout_structure,
)
from personalize.adapters.hypernetwork.unet import (
    STACK_ATTR,
    HypernetworkAttnProcessor,
    HypernetworkStack,
    attach,
    attention_widths,
    check_widths,
    load_into_pipeline,
    remove_hypernetworks,
    set_strength,
)

__all__ = [
    "ACTIVATIONS",
    "FORMAT_VERSION",
    "STACK_ATTR",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkAttnProcessor",
    "HypernetworkModule",
    "HypernetworkOptions",
    "HypernetworkPair",
    "HypernetworkStack",
    "attach",
    "attention_widths",
    "check_widths",
    "convert_hypernetwork",
    "default_dropout_structure",
    "find_hypernetwork_file",
    "hypernetwork_from_dict",
    "load_into_pipeline",
    "read_hypernetwork",
    "remove_hypernetworks",
    "save_hypernetwork",
    "set_strength",
]
