"""Hypernetworks: webui architecture and files, the attention processor, training, loading."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import base_config
from diffusers import StableDiffusionPipeline
from helpers import ROOT, launch_two_processes

from personalize import load, train
from personalize.adapters import hypernetwork as H
from personalize.config import ConfigError, from_dict
from personalize.inference import ArtifactError, detect_artifact, generate
from personalize.methods.hypernetwork import HypernetworkMethod
from personalize.models import load_parts
from personalize.testing import tiny_unet

PROMPT = "a photo of sks disc"
TINY_SIZES = [32, 64]  # tiny model: text context 32, self-attention 32 and 64
NAME = "sks_style"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models gain nothing from a second thread, and on a shared 2-core machine
    OpenMP's spinning threads make each forward ~80x slower (measured: 0.05 s vs 4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pipe(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompt=PROMPT):
    return np.stack(
        [
            np.asarray(im, dtype=np.float32)
            for im in generate(pipe, [prompt], [0, 1], num_inference_steps=4, resolution=32)[0]
        ]
    )


@pytest.fixture(scope="module")
def base_images(tiny_model_dir):
    return _images(_pipe(tiny_model_dir))


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), ctx).sample


def _types(module: H.HypernetworkModule) -> list[str]:
    return [type(m).__name__ for m in module.linear]


# ------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(), ["Linear", "Linear"]),
        (dict(activation_func="relu"), ["Linear", "ReLU", "Linear"]),
        (dict(activation_func="relu", activate_output=True), ["Linear", "ReLU", "Linear", "ReLU"]),
        (
            dict(activation_func="swish", is_layer_norm=True),
            ["Linear", "Hardswish", "LayerNorm", "Linear", "LayerNorm"],
        ),
        # The webui's dropout rule: hidden layers but the last get 0.3; the last one only with
        # last_layer_dropout; never the output.
        (dict(layer_structure=[1, 2, 1], use_dropout=True), ["Linear", "Linear"]),
        (
            dict(layer_structure=[1, 2, 1], use_dropout=True, last_layer_dropout=True),
            ["Linear", "Dropout", "Linear"],
        ),
        (
            dict(layer_structure=[1, 2, 2, 1], use_dropout=True, activation_func="elu"),
            ["Linear", "ELU", "Dropout", "Linear", "ELU", "Linear"],
        ),
        (
            dict(layer_structure=[1, 2, 2, 1], use_dropout=True, last_layer_dropout=True),
            ["Linear", "Dropout", "Linear", "Dropout", "Linear"],
        ),
        (
            dict(layer_structure=[1, 1.5, 1], use_dropout=True, dropout_structure=[0, 0.1, 0]),
            ["Linear", "Dropout", "Linear"],
        ),
    ],
)
def test_module_layout_is_the_webuis(options, expected):
    module = H.HypernetworkModule(8, H.HypernetworkOptions(**options))
    assert _types(module) == expected
    ls = options.get("layer_structure", [1, 2, 1])
    linears = [m for m in module.linear if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (int(8 * a), int(8 * b)) for a, b in zip(ls, ls[1:])
    ]


def test_dropout_structure_rule_and_behaviour():
    assert H.default_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert H.default_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert H.default_dropout_structure([1, 2, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0.3, 0]
    torch.manual_seed(0)
    module = H.HypernetworkModule(
        16,
        H.HypernetworkOptions(
            layer_structure=[1, 4, 1],
            use_dropout=True,
            dropout_structure=[0, 0.5, 0],
            weight_initialization="XavierNormal",
        ),
    )
    x = torch.randn(4, 16)
    module.train()
    assert not torch.equal(module(x), module(x))  # dropout is active while training
    module.eval()
    assert torch.equal(module(x), module(x))
    drop = [m for m in module.linear if isinstance(m, torch.nn.Dropout)]
    assert [m.p for m in drop] == [0.5]


def test_weight_inits_follow_the_webui():
    torch.manual_seed(0)
    m = H.HypernetworkModule(64, H.HypernetworkOptions(is_layer_norm=True))
    lin, ln = m.linear[0], m.linear[1]
    assert abs(lin.weight.std().item() - 0.01) < 0.002 and lin.bias.abs().sum() == 0
    # LayerNorm is initialized like "Normal" too (the webui's choice), whatever the init.
    k = H.HypernetworkModule(
        64, H.HypernetworkOptions(is_layer_norm=True, weight_initialization="KaimingNormal")
    )
    assert k.linear[1].weight.abs().max() < 0.1 and k.linear[0].weight.std() > 0.1
    assert ln.weight.abs().max() < 0.1 and ln.bias.abs().sum() == 0
    # Residual: a fresh module is close to the identity.
    x = torch.randn(3, 64)
    assert (m(x) - x).abs().max() < 0.5


def test_options_are_checked():
    for bad, key in [
        (dict(layer_structure=[2, 1]), "layer_structure"),
        (dict(activation_func="wiggle"), "activation_func"),
        (dict(weight_initialization="He"), "weight_initialization"),
        (dict(use_dropout=True, dropout_structure=[0, 1.0, 0]), "dropout_structure"),
        (dict(dropout_structure=[0, 0.1]), "dropout_structure"),
    ]:
        with pytest.raises(ValueError, match=key):
            H.Hypernetwork([8], H.HypernetworkOptions(**bad))


# ------------------------------------------------------------------------------ processor


def test_processor_with_zero_mlps_equals_the_base_attention_bit_for_bit():
    unet = tiny_unet().eval()
    base = _unet_out(unet)
    hn = H.Hypernetwork(TINY_SIZES)
    for p in hn.parameters():
        torch.nn.init.zeros_(p)
    H.attach(unet, hn)
    assert all(isinstance(p, H.HypernetworkAttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(_unet_out(unet), base)  # our SDPA path == diffusers' AttnProcessor2_0
    H.remove_hypernetworks(unet)
    assert not hasattr(unet, H.STACK_ATTR)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())


def test_strength_scales_and_stacks_like_the_webui():
    unet = tiny_unet().eval()
    base = _unet_out(unet)
    torch.manual_seed(1)
    a = H.Hypernetwork(
        TINY_SIZES, H.HypernetworkOptions(weight_initialization="XavierNormal"), name="a"
    )
    b = H.Hypernetwork(
        [64],
        H.HypernetworkOptions(activation_func="tanh", weight_initialization="XavierUniform"),
        name="b",
    )
    H.attach(unet, a, strength=0.5)
    half = _unet_out(unet)
    H.set_strength(unet, 0.0)
    assert torch.equal(_unet_out(unet), base)
    H.set_strength(unet, 1.0)
    full = _unet_out(unet)
    assert not torch.equal(half, base) and not torch.equal(full, half)
    H.attach(unet, b)  # chained: k = to_k(b.k(a.k(ctx)))
    both = _unet_out(unet)
    assert not torch.equal(both, full)
    # Check the chain by hand on one layer: k input = b.k(a.k(x)) at width 64.
    x = torch.randn(1, 5, 64)
    pair_a, pair_b = a.pair(64), b.pair(64)
    stack = getattr(unet, H.STACK_ATTR)
    got = x
    for pair, s in stack.active(64):
        got = pair.k(got, s)
    assert torch.allclose(got, pair_b.k(pair_a.k(x)))
    assert [p for p, _ in stack.active(32)] == [a.pair(32)]  # b has no width-32 pair


def test_xformers_path_matches_sdpa(monkeypatch):
    """xformers is CUDA-only; a stand-in with its signature checks our use of it."""
    import types

    from diffusers.models.attention_processor import XFormersAttnProcessor

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
        w = (q @ k.transpose(-1, -2)) * scale
        if attn_bias is not None:
            w = w + attn_bias
        return w.softmax(-1) @ v

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.SimpleNamespace(ops=ops))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    torch.manual_seed(2)
    hn = H.Hypernetwork(TINY_SIZES, H.HypernetworkOptions(weight_initialization="XavierNormal"))
    sdpa = tiny_unet().eval()
    H.attach(sdpa, hn)
    xf = tiny_unet().eval()
    xf.set_attn_processor(XFormersAttnProcessor())
    H.attach(xf, hn)
    assert all(p.use_xformers for p in xf.attn_processors.values())
    assert torch.allclose(_unet_out(xf), _unet_out(sdpa), atol=1e-5)


class _TwoAttentions(torch.nn.Module):
    """A self-attention (width 64) and a cross-attention (text width 32), as in a UNet block;
    much faster than the whole UNet for trying every option."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn1 = Attention(query_dim=64, heads=4, dim_head=16)
        self.attn2 = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16)

    def forward(self, x, ctx):
        x = x + self.attn1(x)
        return x + self.attn2(x, encoder_hidden_states=ctx)


@pytest.mark.parametrize(
    "activation, init",
    [(a, "Normal") for a in H.ACTIVATIONS] + [("leakyrelu", w) for w in H.WEIGHT_INITS],
)
def test_every_activation_and_init_builds_and_trains_a_step(activation, init):
    torch.manual_seed(0)
    model = _TwoAttentions().requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hn = H.Hypernetwork(
        TINY_SIZES,
        H.HypernetworkOptions(
            activation_func=activation,
            weight_initialization=init,
            activate_output=True,
            is_layer_norm=init != "Normal",
            layer_structure=[1, 2, 2, 1],
            use_dropout=True,
            last_layer_dropout=True,
        ),
    )
    H.attach(model, hn)
    start = [p.detach().clone() for p in hn.parameters()]
    opt = torch.optim.AdamW(hn.parameters(), lr=1e-3)
    x, ctx = torch.randn(2, 16, 64), torch.randn(2, 7, 32)
    loss = torch.nn.functional.mse_loss(model(x, ctx), torch.randn(2, 16, 64))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in hn.parameters())
    opt.step()
    # Some activations (hardshrink, ...) zero the tiny Normal-init signal, so not every
    # weight gets a gradient on the first step; the last layer always does.
    assert any(not torch.equal(a, b) for a, b in zip(start, hn.parameters()))
    for key, value in model.state_dict().items():
        if not key.startswith(H.STACK_ATTR):
            assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def hn_run(tiny_model_dir, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hn") / "run"
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            out,
            method="hypernetwork",
            train={"max_steps": 6, "lr": 5e-3, "checkpoint_every": 3},
            hn={
                "enable_sizes": TINY_SIZES,
                "activation": "relu",
                "layer_structure": [1, 2, 2, 1],
                "layer_norm": True,
                "use_dropout": True,
                "name": NAME,
            },
        )
    )
    parts = load_parts(str(tiny_model_dir))
    base = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in parts.modules().items()
    }
    train(cfg, parts=parts)
    return out, parts, base, cfg


def test_pretrained_weights_bit_identical_after_training(hn_run):
    _, parts, base, _ = hn_run
    for name, module in parts.modules().items():
        now = module.state_dict()
        for key, value in base[name].items():
            assert torch.equal(now[key], value), f"{name}.{key}"
    trained = [k for k in parts.unet.state_dict() if k.startswith(H.STACK_ATTR)]
    assert trained and {k.split(".")[4] for k in trained} == {"32", "64"}


def test_artifact_files_have_the_webui_layout(hn_run):
    out, parts, _, _ = hn_run
    assert (out / f"{NAME}.pt").is_file() and (out / f"{NAME}.safetensors").is_file()
    raw = torch.load(out / f"{NAME}.pt", weights_only=True)
    assert sorted(k for k in raw if isinstance(k, int)) == TINY_SIZES
    for width in TINY_SIZES:
        k_state, v_state = raw[width]
        # [1, 2, 2, 1] relu + layer norm + dropout on the first hidden layer:
        # Linear ReLU LayerNorm Dropout | Linear ReLU LayerNorm | Linear LayerNorm
        assert sorted({key.rsplit(".", 1)[0] for key in k_state}) == [
            "linear.0",
            "linear.2",
            "linear.4",
            "linear.6",
            "linear.7",
            "linear.8",
        ]
        assert k_state["linear.0.weight"].shape == (2 * width, width)
        assert set(v_state) == set(k_state)
    assert raw["layer_structure"] == [1, 2, 2, 1] and raw["activation_func"] == "relu"
    assert raw["is_layer_norm"] is True and raw["weight_initialization"] == "Normal"
    assert raw["use_dropout"] is True and raw["dropout_structure"] == [0, 0.3, 0, 0]
    assert raw["last_layer_dropout"] is False and raw["activate_output"] is False
    assert raw["name"] == NAME and raw["step"] == 6
    assert "sd_checkpoint" in raw and raw["sd_checkpoint_name"] == "tiny-sd"
    assert "optional_info" in raw


def test_checkpoint_holds_the_mlps_and_restores_them(hn_run, tiny_model_dir):
    from safetensors.torch import load_file

    from personalize.training import checkpoint as ckpt

    out, parts, _, cfg = hn_run
    last = ckpt.complete_checkpoints(out)[-1]
    state = load_file(str(last / ckpt.TRAINABLE_FILE))
    assert state and all(k.startswith(f"unet.{H.STACK_ATTR}.") for k in state)
    fresh = load_parts(str(tiny_model_dir))
    for m in fresh.modules().values():
        m.requires_grad_(False)
    method = HypernetworkMethod(cfg)
    method.setup(fresh)
    method.load_trainable_state_dict(fresh, state)
    trained = HypernetworkMethod(cfg).trainable_state_dict(parts)
    assert all(torch.equal(trained[k], v) for k, v in state.items())


def test_strength_zero_is_the_base_image_and_trained_changes_it(
    hn_run, tiny_model_dir, base_images
):
    out, *_ = hn_run
    assert detect_artifact(out) == "hypernetwork"
    before = base_images
    pipe = load(_pipe(tiny_model_dir), out)
    assert np.abs(_images(pipe) - before).mean() > 0.5
    pipe0 = load(_pipe(tiny_model_dir), out, strength=0.0)
    assert np.array_equal(_images(pipe0), before)


def test_round_trip_pt_safetensors_module_identical(hn_run, tmp_path):
    out, parts, _, _ = hn_run
    trained = getattr(parts.unet, H.STACK_ATTR).networks[NAME]
    from_pt = H.read_hypernetwork(out / f"{NAME}.pt")
    from_st = H.read_hypernetwork(out / f"{NAME}.safetensors")
    pt_to_st = H.read_hypernetwork(
        H.convert_hypernetwork(out / f"{NAME}.pt", tmp_path / "a.safetensors")
    )
    st_to_pt = H.read_hypernetwork(
        H.convert_hypernetwork(out / f"{NAME}.safetensors", tmp_path / "b.pt")
    )
    x = {w: torch.randn(2, 9, w) for w in TINY_SIZES}
    trained.eval()

    def outputs(hn):
        hn.eval()
        with torch.no_grad():
            return [hn.pair(w).k(x[w]) for w in TINY_SIZES] + [
                hn.pair(w).v(x[w]) for w in TINY_SIZES
            ]

    ref = outputs(trained)
    for hn in (from_pt, from_st, pt_to_st, st_to_pt):
        assert hn.options == trained.options and hn.name == NAME and hn.step == 6
        assert all(torch.equal(a, b) for a, b in zip(outputs(hn), ref))
    unets = []
    for hn in (from_pt, from_st):
        unet = tiny_unet().eval()
        H.attach(unet, hn)
        unets.append(_unet_out(unet))
    assert torch.equal(unets[0], unets[1])


def test_stacks_with_a_lora(hn_run, tiny_model_dir, tmp_path, base_images):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out, *_ = hn_run
    lora_pipe = _pipe(tiny_model_dir)
    lora_pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in lora_pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(lora_pipe.unet)),
        safe_serialization=True,
    )
    lora_only = _images(load(_pipe(tiny_model_dir), tmp_path))
    hn_only = _images(load(_pipe(tiny_model_dir), out))
    pipe = load(load(_pipe(tiny_model_dir), tmp_path), out)
    both = _images(pipe)
    assert np.abs(both - lora_only).mean() > 0.5 and np.abs(both - hn_only).mean() > 0.5
    assert np.abs(both - base_images).mean() > 0.5
    # The processor calls the peft-wrapped to_k/to_v: the LoRA acts through it.
    H.set_strength(pipe.unet, 0.0)
    assert np.abs(_images(pipe) - lora_only).max() <= 1.0
    # Loading order does not matter: hypernetwork first, then the LoRA.
    reverse = load(load(_pipe(tiny_model_dir), out), tmp_path)
    assert np.abs(_images(reverse) - both).max() <= 1.0


# ------------------------------------------------------------------------------ webui files


def _linear(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.1, torch.randn(out_f, generator=g) * 0.1


def test_loads_a_hand_built_webui_file(tmp_path, tiny_model_dir, base_images):
    """Built here to the webui layout, independent of our saver: relu MLP [1, 2, 1]."""
    raw = {}
    weights = {}
    for width in TINY_SIZES:
        pair = []
        for j, _ in enumerate("kv"):
            w0, b0 = _linear(2 * width, width, width + j)
            w2, b2 = _linear(width, 2 * width, 100 + width + j)
            weights[(width, j)] = (w0, b0, w2, b2)
            pair.append(
                OrderedDict(
                    [
                        ("linear.0.weight", w0),
                        ("linear.0.bias", b0),
                        ("linear.2.weight", w2),
                        ("linear.2.bias", b2),
                    ]
                )
            )
        raw[width] = tuple(pair)
    raw.update(
        {
            "step": 1234,
            "name": "webui_made",
            "layer_structure": [1, 2, 1],
            "activation_func": "relu",
            "is_layer_norm": False,
            "weight_initialization": "Normal",
            "sd_checkpoint": "abcdef1234",
            "sd_checkpoint_name": "v1-5-pruned",
            "activate_output": False,
            "use_dropout": False,
            "dropout_structure": [0, 0, 0],
            "last_layer_dropout": False,
            "optional_info": None,
        }
    )
    path = tmp_path / "webui_made.pt"
    torch.save(raw, path)
    assert detect_artifact(path) == "hypernetwork"
    hn = H.read_hypernetwork(path)
    assert hn.widths == TINY_SIZES and hn.step == 1234 and hn.sd_checkpoint == "abcdef1234"
    x = torch.randn(3, 5, 32)
    w0, b0, w2, b2 = weights[(32, 1)]
    expected = x + (torch.relu(x @ w0.T + b0) @ w2.T + b2)
    assert torch.allclose(hn.eval().pair(32).v(x), expected, atol=1e-6)
    assert torch.allclose(hn.pair(32).v(x, 0.5), x + 0.5 * (expected - x), atol=1e-6)
    pipe = load(_pipe(tiny_model_dir), path, strength=1.0)
    assert np.abs(_images(pipe) - base_images).mean() > 0.1


def test_legacy_linear1_linear2_file_with_missing_options(tmp_path):
    """Old files: linear1/linear2 keys and no option keys -> the webui's defaults:
    [1, 2, 1], no activation, no layer norm, no dropout."""
    w1, b1 = _linear(64, 32, 1)
    w2, b2 = _linear(32, 64, 2)
    state = {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    path = tmp_path / "old.pt"
    torch.save({32: (state, dict(state))}, path)
    hn = H.read_hypernetwork(path)
    assert hn.options.layer_structure == [1, 2, 1] and hn.options.activation_func is None
    assert hn.options.activate_output is True and hn.options.is_layer_norm is False
    assert hn.options.dropout_structure == [0, 0, 0] and hn.name == "old" and hn.step == 0
    x = torch.randn(2, 4, 32)
    assert torch.allclose(hn.pair(32).k(x), x + (x @ w1.T + b1) @ w2.T + b2, atol=1e-6)


def test_missing_activate_output_defaults_to_true(tmp_path):
    """A file from before the activate_output option had its output activated."""
    w0, b0 = _linear(64, 32, 1)
    w2, b2 = _linear(32, 64, 2)
    state = {"linear.0.weight": w0, "linear.0.bias": b0, "linear.2.weight": w2, "linear.2.bias": b2}
    path = tmp_path / "relu_old.pt"
    torch.save({32: (state, state), "activation_func": "relu", "layer_structure": [1, 2, 1]}, path)
    hn = H.read_hypernetwork(path)
    x = torch.randn(2, 4, 32)
    expected = x + torch.relu(torch.relu(x @ w0.T + b0) @ w2.T + b2)
    assert torch.allclose(hn.pair(32).k(x), expected, atol=1e-6)


def test_missing_dropout_structure_is_derived_like_the_webui(tmp_path):
    """use_dropout without dropout_structure: [1, 2, 2, 1] -> [0, 0.3, 0, 0], which puts a
    Dropout at index 1 and shifts the later Linear keys to linear.2 / linear.3."""
    module = {}
    for idx, (o, i) in zip((0, 2, 3), ((64, 32), (64, 64), (32, 64))):
        w, b = _linear(o, i, idx)
        module[f"linear.{idx}.weight"], module[f"linear.{idx}.bias"] = w, b
    path = tmp_path / "drop.pt"
    torch.save(
        {
            32: (module, module),
            "layer_structure": [1, 2, 2, 1],
            "use_dropout": True,
            "activate_output": False,
        },
        path,
    )
    hn = H.read_hypernetwork(path)
    assert hn.options.dropout_structure == [0, 0.3, 0, 0]
    assert _types(hn.pair(32).k) == ["Linear", "Dropout", "Linear", "Linear"]


# ------------------------------------------------------------------------------ bad files


class _Payload:
    """Unpickling this runs `Path.touch(marker)`: stands in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, tiny_model_dir):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({32: (_Payload(marker), {}), "layer_structure": [1, 2, 1]}, path)
    pipe = _pipe(tiny_model_dir)
    for attempt in (
        lambda: load(pipe, path),
        lambda: H.read_hypernetwork(path),
        lambda: load(pipe, tmp_path),
    ):
        with pytest.raises(ArtifactError, match="refused to load.*weights_only=True"):
            attempt()
        assert not marker.exists()
    assert not hasattr(pipe.unet, H.STACK_ATTR)
    # The file really is a payload: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def _tiny_file(tmp_path, widths, name="f.pt", **extra):
    hn = H.Hypernetwork(widths)
    raw = dict(hn.module_state_dicts())
    raw.update(hn.file_fields())
    raw.update(extra)
    torch.save(raw, tmp_path / name)
    return tmp_path / name, raw


def test_widths_not_in_the_model_are_a_clear_error(tmp_path, tiny_model_dir):
    path, _ = _tiny_file(tmp_path, [768, 320, 640, 1280], "sd1.pt")
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(ArtifactError, match=r"widths \[320, 640, 768, 1280\].*\[32, 64\]"):
        load(pipe, path)
    assert not hasattr(pipe.unet, H.STACK_ATTR)
    partial, _ = _tiny_file(tmp_path, [32, 1024], "partial.pt")
    with pytest.raises(ArtifactError, match=r"widths \[1024\].*strict=False"):
        load(pipe, partial)
    hn = H.load_into_pipeline(pipe, partial, strict=False)
    assert hn.widths == [32, 1024]


def test_broken_files_are_clear_errors(tmp_path, tiny_model_dir):
    pipe = _pipe(tiny_model_dir)
    path, raw = _tiny_file(tmp_path, [32])
    k_state, v_state = raw[32]
    cases = {
        "missing.pt": (
            {32: ({k: v for k, v in k_state.items() if k != "linear.1.bias"}, v_state)},
            r"width 32 k.*missing \['linear.1.bias'\]",
        ),
        "options_mismatch.pt": (
            {
                32: (k_state, v_state),
                "activation_func": "relu",
                "activate_output": True,
                "is_layer_norm": True,
            },
            r"unexpected|missing",
        ),
        "shape.pt": (
            {32: (k_state, {**v_state, "linear.0.weight": torch.zeros(3, 3)})},
            r"width 32 v.*wrong shapes",
        ),
        "not_pair.pt": ({32: (k_state,), "layer_structure": [1, 2, 1]}, r"\(k, v\) pair"),
        "bad_structure.pt": (
            {32: (k_state, v_state), "layer_structure": [2, 1]},
            "layer_structure",
        ),
        "bad_activation.pt": (
            {32: (k_state, v_state), "activation_func": "wiggle"},
            "activation_func",
        ),
    }
    for name, (data, pattern) in cases.items():
        torch.save(data, tmp_path / name)
        with pytest.raises(ArtifactError, match=pattern):
            load(pipe, tmp_path / name)
    assert not hasattr(pipe.unet, H.STACK_ATTR)
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(ArtifactError, match="not a readable PyTorch file"):
        load(pipe, tmp_path / "garbage.pt")
    from safetensors.torch import save_file

    save_file(
        {"32.k.linear.0.weight": torch.zeros(64, 32), "32.k.linear.0.bias": torch.zeros(64)},
        str(tmp_path / "half.safetensors"),
    )
    with pytest.raises(ArtifactError, match=r"width 32 k.*missing \['linear.1.bias'"):
        load(pipe, tmp_path / "half.safetensors")


def test_other_artifacts_are_not_taken_for_hypernetworks(tmp_path):
    from safetensors.torch import save_file

    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.zeros(1, 32)},
            "name": "emb",
            "step": 1,
        },
        tmp_path / "embedding.pt",
    )
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
        str(tmp_path / "lora.safetensors"),
    )
    save_file({"<concept>": torch.zeros(1, 32)}, str(tmp_path / "learned_embeds.safetensors"))
    for name in ("embedding.pt", "lora.safetensors", "learned_embeds.safetensors"):
        assert H.find_hypernetwork_file(tmp_path / name) is None, name
    assert H.find_hypernetwork_file(tmp_path) is None


# ------------------------------------------------------------------------------ config, runs


def test_config_errors_name_the_hn_key(tiny_model_dir, instance_dir, tmp_path):
    def cfg(**hn):
        return base_config(
            tiny_model_dir, instance_dir, tmp_path / "run", method="hypernetwork", hn=hn
        )

    with pytest.raises(ConfigError, match=r"hypernetwork\.activation: unknown 'wiggle'"):
        from_dict(cfg(activation="wiggle"))
    with pytest.raises(ConfigError, match=r"hypernetwork\.use_dropout"):
        from_dict(cfg(dropout_structure=[0, 0.2, 0]))
    with pytest.raises(ConfigError, match=r"hypernetwork\.layer_structure"):
        from_dict(cfg(layer_structure=[1, 2]))
    # The default SD1 widths do not exist in the tiny model: said before anything trains.
    method = HypernetworkMethod(from_dict(cfg()))
    parts = load_parts(str(tiny_model_dir))
    with pytest.raises(
        ConfigError,
        match=r"hypernetwork\.enable_sizes: widths \[320, 640, 768, 1280\]"
        r".*\[32, 64\]",
    ):
        method.setup(parts)


def test_replaced_processors_are_caught(tiny_model_dir, instance_dir, tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            tmp_path / "run",
            method="hypernetwork",
            hn={"enable_sizes": TINY_SIZES},
        )
    )
    parts = load_parts(str(tiny_model_dir))
    method = HypernetworkMethod(cfg)
    method.setup(parts)
    parts.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="processors were replaced"):
        method.check_before_training(parts)


def test_the_loop_checks_the_processors_before_the_first_step(
    tiny_model_dir, instance_dir, tmp_path
):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from personalize.training.loop import Trainer

    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            tmp_path / "run",
            method="hypernetwork",
            hn={"enable_sizes": TINY_SIZES},
        )
    )
    trainer = Trainer(cfg)
    trainer.parts.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="processors were replaced"):
        trainer.run()
    assert trainer.global_step == 0


def test_example_config_parses():
    from personalize.config import load_config

    cfg = load_config(ROOT / "configs" / "hypernetwork.yaml")
    assert cfg.method == "hypernetwork" and cfg.hypernetwork.enable_sizes == [768, 320, 640, 1280]
    assert 5e-6 <= cfg.train.lr <= 5e-5


def test_two_process_cpu_run(tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            base_config(
                tiny_model_dir,
                instance_dir,
                out,
                method="hypernetwork",
                train={"max_steps": 3, "lr": 5e-3, "gradient_checkpointing": True},
                hn={
                    "enable_sizes": TINY_SIZES,
                    "use_dropout": True,
                    "layer_structure": [1, 2, 2, 1],
                    "activation": "elu",
                    "name": NAME,
                },
            )
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    proc = subprocess.run(
        launch_two_processes("personalize", "train", str(cfg_path), multi_gpu=True),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    hn = H.read_hypernetwork(out / f"{NAME}.pt")
    assert hn.step == 3 and hn.widths == TINY_SIZES
    st = H.read_hypernetwork(out / f"{NAME}.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(hn.parameters(), st.parameters()))
