"""Regularizers against forgetting, added to the loss through `Method.extra_loss`.

Shared by `method: dreambooth` (the whole UNet, optionally the text encoder, trains) and
`method: lora` (only adapters train), configured in the `db` section:

- **L2-SP** (Li et al., 2018, "Explicit inductive bias for transfer learning"):
  lambda * sum (theta - theta*)^2 pulls the trained weights toward the pretrained ones.
  Full fine-tuning keeps theta* (the "anchor") per `regularization.weight_constraint_anchor`; LoRA
  needs no anchor at all, because its effective weight change is exactly s * B @ A.
- **Distillation prior**: a frozen teacher (the original model) predicts the noise for the
  class prompt on the step's noisy latents and the student is pulled to match it, so the
  class keeps its meaning without any class images. The teacher is a half-precision copy
  for full fine-tuning, and the very same weights with the adapters switched off for LoRA.

docs/dreambooth.md lists what each one costs in memory and time.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from personalize.errors import ConfigError
from personalize.models import SDParts, tokenize
from personalize.precision import canonical_precision, precision_dtype

logger = logging.getLogger(__name__)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / compile wrapper. A second forward through the bare module
    still sends its gradients into the same parameters (DDP syncs them once, at the
    parameters' hooks), whereas a second forward through the DDP wrapper in one step
    would arm its reducer twice."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)


def _adapter_layers(module: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(module: torch.nn.Module) -> bool:
    """peft layers inside, however they were attached (diffusers' add_adapter on the UNet,
    peft's inject_adapter_in_model on the text encoder)."""
    return bool(_adapter_layers(module))


@contextmanager
def adapters_disabled(*modules: torch.nn.Module) -> Iterator[None]:
    """Run the base model of peft-adapted modules, through peft's own layers (not the
    transformers integration, which gates on the installed peft version).

    peft's enable_adapters() re-enables requires_grad on every active adapter, which would
    also undo a deliberate freeze; the flags are therefore restored exactly as they were."""
    layers = [layer for m in modules for layer in _adapter_layers(m)]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------ L2-SP


class AnchorStore:
    """theta* for a list of parameters, captured at set-up (before any step or resume, so a
    resumed run keeps the true pretrained weights) and placed on first use:

    - `device`: fp32 on the training device: exact, 4 bytes per trained parameter there.
    - `auto`: on a GPU, fp16 on the GPU (2 bytes per parameter, relative rounding <= 2^-11,
      far below a fine-tuning step); on a CPU, fp32 (exact: host memory is the device).
    - `cpu`: fp32 in (pinned) host memory, streamed to the device in forward and backward:
      exact and no device memory, for 8 bytes per parameter of host->device traffic a step.
    """

    FP16_MAX = 65000.0

    def __init__(self, params: list[torch.nn.Parameter], mode: str):
        if mode not in ("auto", "device", "cpu"):
            raise ConfigError(
                f"regularization.weight_constraint_anchor must be auto, device or cpu, got {mode!r}"
            )
        self.mode = mode
        self._host = [p.detach().to("cpu", torch.float32, copy=True) for p in params]
        self._placed: list[torch.Tensor] | None = None
        self.device: torch.device | None = None

    def __len__(self) -> int:
        return len(self._host) if self._placed is None else len(self._placed)

    def _place(self, device: torch.device) -> None:
        self.device = device
        if self.mode == "cpu":
            if device.type == "cuda":
                self._host = [a.pin_memory() for a in self._host]
            self._placed = self._host
            return
        half = self.mode == "auto" and device.type != "cpu"
        placed = []
        for a in self._host:
            keep_fp32 = not half or a.abs().max().item() > self.FP16_MAX
            placed.append(a.to(device, torch.float32 if keep_fp32 else torch.float16))
        self._placed = placed
        self._host = []  # the device copy is the anchor now; free the host one

    def get(self, index: int, device: torch.device) -> torch.Tensor:
        """theta*[index] as fp32 on `device` (a temporary when stored in fp16 or on the host)."""
        if self._placed is None:
            self._place(device)
        return self._placed[index].to(device, torch.float32, non_blocking=True)

    def nbytes(self) -> int:
        tensors = self._placed if self._placed is not None else self._host
        return sum(t.numel() * t.element_size() for t in tensors)


class _SquaredDistance(torch.autograd.Function):
    """sum (p - anchor)^2 for one parameter. Autograd would keep (p - anchor) for the
    backward pass, a full fp32 copy of every trained tensor until then; this saves only `p`
    (a reference) and recomputes the difference in backward, one tensor at a time."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, store: AnchorStore, index: int) -> torch.Tensor:
        ctx.save_for_backward(param)
        ctx.store, ctx.index = store, index
        diff = param.detach().float() - store.get(index, param.device)
        return torch.dot(diff.flatten(), diff.flatten())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (param,) = ctx.saved_tensors
        diff = param.detach().float() - ctx.store.get(ctx.index, param.device)
        return (2.0 * grad_output * diff).to(param.dtype), None, None


class L2SP:
    """lambda * sum over the trained parameters of (theta - theta*)^2."""

    def __init__(self, params: list[torch.nn.Parameter], lam: float, anchor: str = "auto"):
        if not params:
            raise ConfigError("L2-SP: no trained parameters to constrain")
        self.params = params
        self.lam = float(lam)
        self.store = AnchorStore(params, anchor)
        count = sum(p.numel() for p in params)
        logger.info(
            "L2-SP: lambda=%g over %d tensors (%.1fM weights), anchors: %s",
            self.lam,
            len(params),
            count / 1e6,
            anchor,
        )

    def __call__(self, batch: dict[str, Any], outputs, parts: SDParts) -> torch.Tensor:
        terms = [_SquaredDistance.apply(p, self.store, i) for i, p in enumerate(self.params)]
        return self.lam * torch.stack(terms).sum()


class LoRAL2SP:
    """L2-SP for adapters: the adapted weight is W* + s * B @ A with W* frozen, so
    sum (W - W*)^2 = sum_layers ||s * B @ A||_F^2, exact and without any anchor copy.
    ||B A||_F^2 = sum((B^T B) * (A A^T)): two r x r products instead of the out x in one."""

    def __init__(self, modules: list[torch.nn.Module], lam: float):
        from peft.tuners.lora import LoraLayer

        self.lam = float(lam)
        self.layers = []
        for module in modules:
            for name, layer in module.named_modules():
                if not isinstance(layer, LoraLayer):
                    continue
                if any(layer.use_dora.get(a, False) for a in layer.active_adapters):
                    raise ConfigError(
                        "regularization.weight_constraint=l2sp is not defined for DoRA adapters "
                        "(lora.use_dora): their magnitude vector rescales W* itself. "
                        "Turn one of them off."
                    )
                if getattr(layer, "lora_embedding_A", None) and any(
                    a in layer.lora_embedding_A for a in layer.active_adapters
                ):
                    raise ConfigError(
                        f"regularization.weight_constraint=l2sp: embedding adapter {name} "
                        "is not supported; target Linear/Conv layers only"
                    )
                self.layers.append(layer)
        if not self.layers:
            raise ConfigError("regularization.weight_constraint=l2sp: the model has no LoRA layers")
        logger.info(
            "L2-SP on LoRA: lambda=%g over %d adapted layers (no anchor copy)",
            self.lam,
            len(self.layers),
        )

    def __call__(self, batch: dict[str, Any], outputs, parts: SDParts) -> torch.Tensor:
        terms = []
        for layer in self.layers:
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                a = layer.lora_A[adapter].weight.float().flatten(1)  # [r, in * k * k]
                b = layer.lora_B[adapter].weight.float().flatten(1)  # [out, r]
                scale = float(layer.scaling[adapter])
                terms.append(scale * scale * ((b.T @ b) * (a @ a.T)).sum())
        return self.lam * torch.stack(terms).sum()


# ------------------------------------------------------------------------------ distillation


def teacher_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    """Half precision on an accelerator (the teacher only runs forward), fp32 on a CPU,
    where half-precision kernels are slow or missing."""
    if device.type == "cpu":
        return torch.float32
    return precision_dtype("bf16" if canonical_precision(mixed_precision) == "bf16" else "fp16")


class DistillationPrior:
    """weight * MSE(student(x_t, t, class prompt), teacher(x_t, t, class prompt)).

    x_t and t are the step's own noisy latents and timesteps: the question "what does the
    class prompt predict for this input?" must keep the original model's answer. With
    `copy_teacher=False` the teacher is the live model with its adapters disabled (LoRA);
    otherwise it is a frozen copy taken before training (of the UNet, and of each text
    encoder that trains).

    SDXL: the class prompt is encoded as the loop encodes captions (both encoders'
    penultimate hidden states, text_encoder_2's pooled projection), and teacher and student
    get the step's own size/crop ids (`batch["time_ids"]`) in `added_cond_kwargs`."""

    def __init__(
        self,
        parts: SDParts,
        class_prompt: str,
        weight: float,
        *,
        copy_teacher: bool,
        mixed_precision: str,
    ):
        self.class_prompt = class_prompt
        self.weight = float(weight)
        self.mixed_precision = mixed_precision
        self.copy_teacher = copy_teacher
        self.teacher_unet: torch.nn.Module | None = None
        self.teacher_text_encoders: dict[str, torch.nn.Module] = {}
        training = {n: _trains(te) for n, te in parts.text_encoders().items()}
        if copy_teacher:
            self.teacher_unet = _frozen_copy(parts.unet)
            self.teacher_text_encoders = {
                n: _frozen_copy(te) for n, te in parts.text_encoders().items() if training[n]
            }
        elif not (
            has_adapters(parts.unet)
            and all(has_adapters(te) for n, te in parts.text_encoders().items() if training[n])
        ):
            raise ConfigError(
                "distillation with a shared teacher needs adapters on every "
                "trained module (the teacher is the model with them disabled)"
            )
        self._ids: dict[str, torch.Tensor] = {}
        self._placed = False
        logger.info(
            "distillation prior: weight %g, class prompt %r, teacher: %s",
            self.weight,
            class_prompt,
            "frozen copy" if copy_teacher else "base weights (adapters disabled)",
        )

    def _place(self, device: torch.device) -> None:
        dtype = teacher_dtype(device, self.mixed_precision)
        for teacher in (self.teacher_unet, *self.teacher_text_encoders.values()):
            if teacher is not None:
                teacher.to(device=device, dtype=dtype)
        self._placed = True

    def _class_ids(self, parts: SDParts, device: torch.device) -> dict[str, torch.Tensor]:
        """The class prompt's token ids per text encoder (SDXL: each its own tokenizer)."""
        if not self._ids or next(iter(self._ids.values())).device != device:
            tokenizers = {"text_encoder": parts.tokenizer, "text_encoder_2": parts.tokenizer_2}
            self._ids = {
                name: tokenize(tokenizers[name], [self.class_prompt]).to(device)
                for name in parts.text_encoders()
            }
        return self._ids

    def _contexts(self, parts: SDParts, device: torch.device):
        """(student, teacher) text conditioning of the class prompt, each (hidden states,
        pooled or None); the student's carries gradients into text encoders that train."""
        ids = self._class_ids(parts, device)
        sdxl = parts.is_sdxl
        student, teacher = [], []
        for name, module in parts.text_encoders().items():
            encoder = unwrap(module)
            if not _trains(encoder):
                with torch.no_grad():
                    out = _encode(encoder, ids[name], sdxl)
                student.append(out)
                teacher.append(out)
                continue
            student.append(_encode(encoder, ids[name], sdxl))
            with torch.no_grad():
                if name in self.teacher_text_encoders:
                    frozen = self.teacher_text_encoders[name]
                    out = _encode(frozen, ids[name], sdxl, run=_run_teacher)
                else:
                    with adapters_disabled(encoder):
                        out = _encode(encoder, ids[name], sdxl)
            teacher.append(tuple(t.detach() if t is not None else None for t in out))
        return _joined(student), _joined(teacher)

    def __call__(self, batch: dict[str, Any], outputs, parts: SDParts) -> torch.Tensor:
        unet = unwrap(outputs.unet)
        noisy = outputs.noisy_latents.detach()
        timesteps = outputs.timesteps
        device = noisy.device
        if self.copy_teacher and not self._placed:
            self._place(device)
        (student_hidden, student_pooled), (teacher_hidden, teacher_pooled) = self._contexts(
            parts, device
        )
        batch_size = noisy.shape[0]
        time_ids = batch.get("time_ids") if parts.is_sdxl else None

        def unet_kwargs(pooled, dtype) -> dict[str, Any]:
            if time_ids is None:
                return {}
            return {
                "added_cond_kwargs": {
                    "text_embeds": pooled.expand(batch_size, -1).to(dtype),
                    "time_ids": time_ids.to(device, dtype),
                }
            }

        with torch.no_grad():
            context = teacher_hidden.expand(batch_size, -1, -1)
            if self.teacher_unet is not None:
                dtype = next(self.teacher_unet.parameters()).dtype
                target = _run_teacher(
                    self.teacher_unet,
                    noisy,
                    timesteps,
                    context,
                    return_dict=False,
                    **unet_kwargs(teacher_pooled, dtype),
                )[0]
            else:
                with adapters_disabled(unet):
                    target = unet(
                        noisy,
                        timesteps,
                        context,
                        return_dict=False,
                        **unet_kwargs(teacher_pooled, student_hidden.dtype),
                    )[0]
        student = unet(
            noisy,
            timesteps,
            student_hidden.expand(batch_size, -1, -1),
            return_dict=False,
            **unet_kwargs(student_pooled, student_hidden.dtype),
        )[0]
        return self.weight * F.mse_loss(student.float(), target.float())


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _encode(encoder, ids: torch.Tensor, sdxl: bool, run=None):
    """(hidden states, pooled) of one text encoder as the UNet is conditioned: SD 1.x/2.x
    its last hidden states (no pooled); SDXL its penultimate ones and, for text_encoder_2,
    the projected pooled output (`text_embeds`)."""
    run = run or (lambda module, *args, **kwargs: module(*args, **kwargs))
    if not sdxl:
        return run(encoder, ids)[0], None
    out = run(encoder, ids, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2], getattr(out, "text_embeds", None)


def _joined(encoded: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """Several encoders' (hidden, pooled) -> (hidden states concatenated, the last pooled)."""
    hidden = torch.cat([h for h, _ in encoded], dim=-1) if len(encoded) > 1 else encoded[0][0]
    pooled = next((p for _, p in reversed(encoded) if p is not None), None)
    return hidden, pooled


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def _run_teacher(module: torch.nn.Module, *args, **kwargs):
    """Forward in the teacher's own dtype (the loop's autocast may want another)."""
    dtype = next(module.parameters()).dtype
    device = next(module.parameters()).device
    cast = [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with torch.autocast(device.type, enabled=False):
        return module(*cast, **kwargs)


# ------------------------------------------------------------------------------ together


Term = Callable[[dict[str, Any], Any, SDParts], torch.Tensor]


class Regularizers:
    """The configured terms; `__call__` is a Method.extra_loss."""

    def __init__(self, terms: dict[str, Term] | None = None):
        self.terms = dict(terms or {})

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, batch: dict[str, Any], outputs, parts: SDParts) -> torch.Tensor | None:
        total = None
        for term in self.terms.values():
            value = term(batch, outputs, parts)
            total = value if total is None else total + value
        return total


def build_regularizers(cfg, parts: SDParts, *, adapters: bool) -> Regularizers:
    """The db section's regularizers for a model whose trainable parameters are already
    marked (call at the end of `Method.setup`). `adapters`: the trained weights are LoRA
    adapters on frozen base weights (method lora)."""
    terms: dict[str, Term] = {}
    if cfg.regularization.weight_constraint == "l2sp":
        if cfg.regularization.weight_constraint_lambda == 0:
            logger.warning(
                "regularization.weight_constraint=l2sp with weight_constraint_lambda=0 has no "
                "effect; set a positive lambda"
            )
        modules = [parts.unet, *parts.text_encoders().values()]  # SDXL: both encoders
        if adapters:
            terms["l2sp"] = LoRAL2SP(modules, cfg.regularization.weight_constraint_lambda)
        else:
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            terms["l2sp"] = L2SP(
                params,
                cfg.regularization.weight_constraint_lambda,
                cfg.regularization.weight_constraint_anchor,
            )
    if cfg.prior.enabled and cfg.prior.kind == "distillation":
        terms["distillation"] = DistillationPrior(
            parts,
            cfg.prior.class_prompt,
            cfg.prior.distillation_weight,
            copy_teacher=not adapters,
            mixed_precision=cfg.train.mixed_precision,
        )
    return Regularizers(terms)
