"""Loading the same artifact twice (a re-run notebook cell) replaces it instead of stacking a
second copy; different artifacts still stack."""

from __future__ import annotations

import logging
import shutil
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline

from personalize import load
from personalize.adapters import hypernetwork as H
from personalize.testing import TINY_RESOLUTION, TINY_TEXT_WIDTH

TINY_SIZES = [32, 64]  # tiny model: text context 32, self-attention 32 and 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pipe(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _unet_out(pipe) -> torch.Tensor:
    """One UNet forward on fixed inputs: every loaded adapter acts on it."""
    g = torch.Generator().manual_seed(0)
    size = TINY_RESOLUTION // 2
    sample = torch.randn(1, 4, size, size, generator=g)
    context = torch.randn(1, 7, TINY_TEXT_WIDTH, generator=g)
    return pipe.unet(sample, 10, encoder_hidden_states=context).sample


def _save_lora(model_dir, folder, seed: int):
    """A UNet LoRA with random (non-zero) B matrices, saved as diffusers saves one."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipe(model_dir)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        safe_serialization=True,
    )
    return folder


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return _save_lora(tiny_model_dir, root / "a", 1), _save_lora(tiny_model_dir, root / "b", 2)


def _save_hypernetwork(path, seed: int, name: str):
    hn = H.Hypernetwork(TINY_SIZES, name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.normal_(0, 0.2)
    return H.save_hypernetwork(hn, path)


def test_lora_loaded_twice_equals_loaded_once(tiny_model_dir, loras, caplog):
    a, _ = loras
    base = _unet_out(_pipe(tiny_model_dir))
    once = _unet_out(load(_pipe(tiny_model_dir), a))
    assert (once - base).abs().mean() > 1e-3  # the LoRA acts
    pipe = load(_pipe(tiny_model_dir), a)
    with caplog.at_level(logging.INFO, logger="personalize"):
        load(pipe, a)
    assert torch.allclose(_unet_out(pipe), once, atol=1e-6)
    assert pipe.get_list_adapters() == {"unet": ["personalize_0"]}
    replaced = [r.getMessage() for r in caplog.records if "replacing" in r.getMessage()]
    assert len(replaced) == 1 and "adapter_name='personalize_0'" in replaced[0]


def test_lora_same_file_by_another_path_and_new_strength_replaces(tiny_model_dir, loras):
    a, _ = loras
    half = _unet_out(load(_pipe(tiny_model_dir), a, strength=0.5))
    pipe = load(_pipe(tiny_model_dir), a / "pytorch_lora_weights.safetensors")
    load(pipe, a, strength=0.5)  # the folder resolves to the same file
    assert torch.allclose(_unet_out(pipe), half, atol=1e-6)


def test_lora_same_adapter_name_replaces_even_another_file(tiny_model_dir, loras):
    a, b = loras
    only_b = _unet_out(load(_pipe(tiny_model_dir), b))
    pipe = load(_pipe(tiny_model_dir), a, adapter_name="style")
    load(pipe, b, adapter_name="style")
    assert torch.allclose(_unet_out(pipe), only_b, atol=1e-6)
    assert pipe.get_list_adapters() == {"unet": ["style"]}


def test_two_different_loras_still_stack(tiny_model_dir, loras):
    a, b = loras
    only_a = _unet_out(load(_pipe(tiny_model_dir), a))
    only_b = _unet_out(load(_pipe(tiny_model_dir), b))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load(load(_pipe(tiny_model_dir), a), b)
    assert not [w for w in caught if "peft_config" in str(w.message)]  # stacking is intended
    both = _unet_out(pipe)
    assert (both - only_a).abs().mean() > 1e-3 and (both - only_b).abs().mean() > 1e-3
    assert sorted(pipe.get_list_adapters()["unet"]) == ["personalize_0", "personalize_1"]
    # Loading the first again replaces it: still two adapters, same output.
    load(pipe, a)
    assert torch.allclose(_unet_out(pipe), both, atol=1e-6)
    assert sorted(pipe.get_list_adapters()["unet"]) == ["personalize_0", "personalize_1"]


def test_lora_copy_in_another_folder_stacks(tiny_model_dir, loras, tmp_path):
    """A different file is a different artifact, even with equal bytes: it stacks (that is
    how one would apply a LoRA at double strength on purpose)."""
    a, _ = loras
    copy = shutil.copytree(a, tmp_path / "copy")
    pipe = load(load(_pipe(tiny_model_dir), a), copy)
    assert len(pipe.get_list_adapters()["unet"]) == 2


def test_hypernetwork_loaded_twice_equals_loaded_once(tiny_model_dir, tmp_path, caplog):
    path = _save_hypernetwork(tmp_path / "style.safetensors", 1, "style")
    base = _unet_out(_pipe(tiny_model_dir))
    once = _unet_out(load(_pipe(tiny_model_dir), path))
    assert (once - base).abs().mean() > 1e-3
    pipe = load(_pipe(tiny_model_dir), path)
    with caplog.at_level(logging.INFO, logger="personalize"):
        load(pipe, path)
    assert torch.allclose(_unet_out(pipe), once, atol=1e-6)
    assert list(getattr(pipe.unet, H.STACK_ATTR).networks) == ["style"]
    replaced = [r.getMessage() for r in caplog.records if "replacing" in r.getMessage()]
    assert len(replaced) == 1 and "adapter_name='style'" in replaced[0]


def test_two_different_hypernetworks_still_stack(tiny_model_dir, tmp_path):
    one = _save_hypernetwork(tmp_path / "one.pt", 1, "one")
    two = _save_hypernetwork(tmp_path / "two.pt", 2, "two")
    only_one = _unet_out(load(_pipe(tiny_model_dir), one))
    pipe = load(load(_pipe(tiny_model_dir), one), two)
    both = _unet_out(pipe)
    assert (both - only_one).abs().mean() > 1e-3
    load(pipe, two)  # again: replaced, not a third network
    assert torch.allclose(_unet_out(pipe), both, atol=1e-6)
    assert list(getattr(pipe.unet, H.STACK_ATTR).networks) == ["one", "two"]
