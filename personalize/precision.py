"""Precision names -> one canonical spelling -> a torch dtype, in one place.

Users write full precision as `no` (accelerate's word), `fp32`, `false` or `off`; YAML 1.1
even turns an unquoted `no`/`off` into the boolean false. All of them mean "no" here.
Half precision asked for on a machine without an accelerator falls back to fp32 with one
warning, because frozen fp16 weights without GPU autocast crash a CPU run on its first step.
bf16 falls back too: CPU bf16 autocast runs, but measured 24x slower than fp32 (6 Linear
768x768 layers, batch 512, forward + backward, one thread, an AMD EPYC without AMX).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from personalize.errors import ConfigError

logger = logging.getLogger(__name__)

# Canonical names: "no" (full precision, fp32), "fp16", "bf16".
FULL_PRECISION_NAMES = ("no", "fp32", "false", "off", "none", "float32")
_HALF = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def canonical_precision(value: Any) -> str:
    """ "no" | "fp16" | "bf16" for any accepted spelling; ValueError otherwise."""
    if value is False:
        return "no"
    if isinstance(value, str):
        name = value.strip().lower()
        if name in FULL_PRECISION_NAMES:
            return "no"
        if name in _HALF:
            return _HALF[name]
    raise ConfigError(f"must be no (or fp32), fp16 or bf16, got {value!r}")


def precision_dtype(value: Any) -> torch.dtype:
    """The torch dtype a precision name stands for (full precision = torch.float32)."""
    return _DTYPES[canonical_precision(value)]


def runtime_precision(requested: str, device: torch.device, key: str, warn: bool = True) -> str:
    """The precision a run can use on `device`: half precision on a CPU falls back to full
    precision (fp32) with one warning naming `key`, instead of a dtype error at step 1."""
    requested = canonical_precision(requested)
    if requested != "no" and torch.device(device).type == "cpu":
        if not warn:
            return "no"
        logger.warning(
            "%s: %s needs a GPU; no GPU here, so this run uses full precision (fp32) "
            "(set %s=no to silence this)",
            key,
            requested,
            key,
        )
        return "no"
    return requested
