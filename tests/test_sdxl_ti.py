"""Textual Inversion on SDXL (issue 17): the placeholder goes into both tokenizers, both text
encoders learn only its rows, and the files load into a stock StableDiffusionXLPipeline
(diffusers' pair, one `load_textual_inversion` call per encoder), under the webui / ComfyUI /
kohya rules (the clip_l/clip_g file) and with `personalize.load`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from client_rules import comfyui_sdxl_embedding, kohya_sdxl_embedding, webui_sdxl_embedding
from conftest import base_config
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import personalize
from personalize import train
from personalize.adapters.embeddings import DIFFUSERS_FILE, DIFFUSERS_FILE_2, read_embedding
from personalize.config import from_dict
from personalize.errors import EmbeddingError
from personalize.methods.textual_inversion import STATE_KEY, STATE_KEY_2
from personalize.models import load_parts
from personalize.training import checkpoint as ckpt
from personalize.training.loop import Trainer

TOKEN = "<sks-disc>"
STEM = "sks-disc"  # the webui/ComfyUI file and trigger word
PROMPT = f"a photo of {TOKEN}"
TI = {"placeholder_token": TOKEN, "initializer_token": "o", "num_vectors": 2}
ENCODERS = ("text_encoder", "text_encoder_2")


def _cfg(model_dir, data_dir, out, **sections):
    sections.setdefault("ti", TI)
    sections["textual_inversion"] = sections.pop("ti")
    return from_dict(base_config(model_dir, data_dir, out, method="textual_inversion", **sections))


def _xl_pipe(model_dir) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt=PROMPT) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def _table(module) -> torch.Tensor:
    return module.get_input_embeddings().weight.detach()


@pytest.fixture(scope="module")
def xl_ti_run(tiny_sdxl_model_dir, instance_dir, tmp_path_factory):
    """4 steps with a large LR and weight decay (which touches every row of both tables),
    an intermediate save and a validation sample."""
    out = tmp_path_factory.mktemp("sdxl_ti") / "run"
    cfg = _cfg(
        tiny_sdxl_model_dir,
        instance_dir,
        out,
        ti=dict(TI, save_every=2),
        train={"max_steps": 4, "lr": 0.05, "weight_decay": 0.5},
        validation={
            "prompts": ["{} on a table"],
            "every_steps": 4,
            "num_inference_steps": 2,
            "num_images": 1,
        },
    )
    parts = load_parts(str(tiny_sdxl_model_dir))
    base = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in parts.modules().items()
    }
    trainer = Trainer(cfg, parts=parts)
    trainer.run()
    return out, trainer, base


def test_only_the_new_rows_change_in_both_text_encoders(xl_ti_run):
    _, trainer, base = xl_ti_run
    parts, method = trainer.parts, trainer.method
    assert set(method.rows) == set(ENCODERS)
    for name in ENCODERS:
        module = parts.modules()[name]
        key = next(k for k in base[name] if k.endswith("token_embedding.weight"))
        old, table = base[name][key], _table(module)
        ids = method.rows[name].ids
        assert ids == [old.shape[0], old.shape[0] + 1]  # appended after the base vocabulary
        assert torch.equal(table[: old.shape[0]], old), name  # bit for bit, despite decay
        initial = method.rows[name]._original[ids]
        assert not torch.equal(table[ids], initial), name  # the new rows learned
        for k, value in module.state_dict().items():
            if k != key:
                assert torch.equal(value, base[name][k]), f"{name}.{k}"
    for name in ("unet", "vae"):
        for k, value in parts.modules()[name].state_dict().items():
            assert torch.equal(value, base[name][k]), f"{name}.{k}"
    # Each encoder started from the initializer word's row of its own table.
    tokenizers = {"text_encoder": parts.tokenizer, "text_encoder_2": parts.tokenizer_2}
    for name in ENCODERS:
        (init_id,) = tokenizers[name].encode("o", add_special_tokens=False)
        start = method.rows[name]._original
        assert torch.equal(start[method.rows[name].ids], start[[init_id, init_id]])


def test_saves_the_diffusers_pair_and_one_clip_l_clip_g_file(xl_ti_run):
    out, trainer, _ = xl_ti_run
    method, parts = trainer.method, trainer.parts
    te1, te2 = method.vectors(parts), method.vectors(parts, "text_encoder_2")
    assert te1.shape == (2, 32) and te2.shape == (2, 48)  # the tiny encoders' widths
    first, second = load_file(out / DIFFUSERS_FILE), load_file(out / DIFFUSERS_FILE_2)
    assert list(first) == [TOKEN] and list(second) == [TOKEN]
    assert torch.equal(first[TOKEN], te1) and torch.equal(second[TOKEN], te2)
    single = load_file(out / f"{STEM}.safetensors")
    assert set(single) == {"clip_l", "clip_g"}
    assert torch.equal(single["clip_l"], te1) and torch.equal(single["clip_g"], te2)
    with safe_open(str(out / f"{STEM}.safetensors"), "pt") as f:
        assert f.metadata()["name"] == STEM and f.metadata()["step"] == "4"
    assert not (out / f"{STEM}.pt").exists()  # the webui's .pt holds one encoder only
    # Intermediate saves come in pairs too (textual_inversion_sdxl.py's names).
    for stem in ("learned_embeds", "learned_embeds_2"):
        assert (out / f"{stem}-steps-2.safetensors").is_file()
    assert torch.equal(load_file(out / "learned_embeds_2-steps-4.safetensors")[TOKEN], te2)
    # The validation sample was drawn with the SDXL pipeline and the learned token.
    assert list((out / "samples").rglob("*.png"))


def test_stock_load_textual_inversion_reads_the_pair(xl_ti_run, tiny_sdxl_model_dir):
    out, trainer, _ = xl_ti_run
    base = _image(_xl_pipe(tiny_sdxl_model_dir))
    pipe = _xl_pipe(tiny_sdxl_model_dir)  # freshly loaded, nothing of ours on it
    pipe.load_textual_inversion(
        str(out / DIFFUSERS_FILE),
        token=TOKEN,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
    )
    pipe.load_textual_inversion(
        str(out / DIFFUSERS_FILE_2),
        token=TOKEN,
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        ids = tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
        table = _table(getattr(pipe, name))
        assert torch.equal(table[ids], trainer.method.vectors(trainer.parts, name))
    stock = _image(pipe)
    assert np.abs(stock - base).mean() > 1e-3  # the embedding changes the image

    # personalize.load of the run folder, of the clip_l/clip_g file and of either half of
    # the pair draws exactly what stock diffusers draws.
    for artifact in (out, out / f"{STEM}.safetensors", out / DIFFUSERS_FILE_2):
        ours = _xl_pipe(tiny_sdxl_model_dir)
        personalize.load(ours, artifact, adapter_name=TOKEN)
        np.testing.assert_array_equal(_image(ours), stock)


def test_clip_l_clip_g_file_loads_under_the_clients_rules(xl_ti_run):
    out, trainer, _ = xl_ti_run
    data = load_file(out / f"{STEM}.safetensors")
    te1 = trainer.method.vectors(trainer.parts)
    te2 = trainer.method.vectors(trainer.parts, "text_encoder_2")
    for got in (
        webui_sdxl_embedding(data, expected_width=32 + 48),
        comfyui_sdxl_embedding(data, clip_l_width=32, clip_g_width=48),
        kohya_sdxl_embedding(data),
    ):
        assert torch.equal(got["clip_l"], te1) and torch.equal(got["clip_g"], te2)


def test_personalize_load_reads_sdxl_embeddings_made_elsewhere(tmp_path, tiny_sdxl_model_dir):
    """A webui/ComfyUI file (no metadata: the trigger word is the file name) and diffusers'
    pair from textual_inversion_sdxl.py (`{"format": "pt"}` metadata) go into both encoders."""
    g = torch.Generator().manual_seed(1)
    clip_l, clip_g = torch.randn(3, 32, generator=g), torch.randn(3, 48, generator=g)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl-style.safetensors"))
    pair = tmp_path / "pair"
    pair.mkdir()
    save_file({"<toy>": clip_l[:1]}, str(pair / DIFFUSERS_FILE), {"format": "pt"})
    save_file({"<toy>": clip_g[:1]}, str(pair / DIFFUSERS_FILE_2), {"format": "pt"})

    pipe = _xl_pipe(tiny_sdxl_model_dir)
    assert personalize.inference.detect_artifact(tmp_path / "xl-style.safetensors") == (
        "textual_inversion"
    )
    personalize.load(pipe, tmp_path / "xl-style.safetensors")
    personalize.load(pipe, pair)
    for name, tokenizer, vectors in (
        ("text_encoder", pipe.tokenizer, clip_l),
        ("text_encoder_2", pipe.tokenizer_2, clip_g),
    ):
        table = _table(getattr(pipe, name))
        ids = tokenizer.convert_tokens_to_ids(["xl-style", "xl-style_1", "xl-style_2"])
        assert torch.equal(table[ids], vectors)
        assert torch.equal(table[tokenizer.convert_tokens_to_ids("<toy>")], vectors[0])
    emb = read_embedding(pair / DIFFUSERS_FILE)
    assert emb.layout == "diffusers_pair" and emb.token == "<toy>"


def test_the_other_model_family_is_a_clear_error(tmp_path, tiny_model_dir, tiny_sdxl_model_dir):
    # Widths equal to the tiny models' own (32): only the family tells them apart.
    save_file(
        {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)},
        str(tmp_path / "xl.safetensors"),
    )
    save_file({"<sd1>": torch.randn(1, 32)}, str(tmp_path / "sd1.safetensors"))
    sd1 = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    with pytest.raises(EmbeddingError, match=r"is an SDXL embedding .* one text encoder") as e:
        personalize.load(sd1, tmp_path / "xl.safetensors")
    assert "\n" not in str(e.value)
    assert "xl" not in sd1.tokenizer.get_vocab()  # nothing half-loaded
    xl = _xl_pipe(tiny_sdxl_model_dir)
    with pytest.raises(EmbeddingError, match="one-encoder embedding .* both text encoders"):
        personalize.load(xl, tmp_path / "sd1.safetensors")
    assert "<sd1>" not in xl.tokenizer.get_vocab()
    # Widths that fit no encoder of this SDXL model say which encoder.
    save_file(
        {"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)},
        str(tmp_path / "real-xl.safetensors"),
    )
    with pytest.raises(EmbeddingError, match="width for text_encoder 768"):
        personalize.load(xl, tmp_path / "real-xl.safetensors")


def test_sample_cli_draws_with_an_sdxl_embedding(xl_ti_run, tiny_sdxl_model_dir, tmp_path):
    from PIL import Image

    from personalize.cli import main

    out, _, _ = xl_ti_run

    def sample(folder, *extra):
        args = ["sample", "--model", str(tiny_sdxl_model_dir), "--prompt", PROMPT]
        args += ["--num-images", "1", "--steps", "2", "--resolution", "32", "--out", str(folder)]
        assert main([*args, *extra]) == 0
        return np.asarray(Image.open(folder / "prompt00_seed0.png"), dtype=np.float32)

    base = sample(tmp_path / "base")
    tuned = sample(tmp_path / "tuned", "--load", str(out))
    assert np.abs(tuned - base).mean() > 0.1


def test_resume_gives_identical_embeddings_in_both_encoders(
    tiny_sdxl_model_dir, instance_dir, tmp_path
):
    common = dict(train={"max_steps": 4, "checkpoint_every": 2, "lr": 0.02, "batch_size": 1})
    straight = train(_cfg(tiny_sdxl_model_dir, instance_dir, tmp_path / "a", **common))
    first = dict(common, train=dict(common["train"], max_steps=2))
    train(_cfg(tiny_sdxl_model_dir, instance_dir, tmp_path / "b", **first))
    checkpoint = ckpt.complete_checkpoints(tmp_path / "b")[-1]
    state = load_file(checkpoint / ckpt.TRAINABLE_FILE)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        STATE_KEY: (2, 32),
        STATE_KEY_2: (2, 48),
    }  # the new rows only
    resumed = _cfg(tiny_sdxl_model_dir, instance_dir, tmp_path / "b", resume="latest", **common)
    trainer = Trainer(resumed)
    trainer.run()
    assert trainer.global_step == 4
    for file in (DIFFUSERS_FILE, DIFFUSERS_FILE_2):
        a, b = load_file(straight / file)[TOKEN], load_file(tmp_path / "b" / file)[TOKEN]
        assert torch.equal(a, b), file


def test_shipped_textual_inversion_config_trains_an_sdxl_model_unchanged(
    tiny_sdxl_model_dir, instance_dir, tmp_path, capsys
):
    """configs/textual_inversion.yaml with only model.path (and the tiny-run overrides every
    shipped config gets) pointing at SDXL: no SDXL-specific setting is needed."""
    from helpers import ROOT
    from test_first_contact_configs import _overrides

    from personalize.cli import main

    config, out = ROOT / "configs" / "textual_inversion.yaml", tmp_path / "run"
    code = main(["train", str(config), *_overrides(config, tiny_sdxl_model_dir, instance_dir, out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert (out / DIFFUSERS_FILE).is_file() and (out / DIFFUSERS_FILE_2).is_file()
    assert set(load_file(out / "my-cat.safetensors")) == {"clip_l", "clip_g"}


@pytest.fixture
def fresh_accelerate_state():
    """The accelerate state is a process-wide singleton fixed at the first precision used."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_keeps_both_tables_fp32_and_their_other_rows_exact(
    tiny_sdxl_model_dir, instance_dir, tmp_path, fresh_accelerate_state, monkeypatch
):
    # Keep bf16 on the CPU (a CPU run otherwise falls back to fp32): bf16 is what is checked.
    monkeypatch.setattr(
        "personalize.training.accelerator.runtime_precision", lambda requested, *_, **__: requested
    )
    cfg = _cfg(
        tiny_sdxl_model_dir,
        instance_dir,
        tmp_path / "run",
        train={"max_steps": 2, "mixed_precision": "bf16", "weight_decay": 0.5},
    )
    parts = load_parts(str(tiny_sdxl_model_dir))
    tables = {name: _table(parts.modules()[name]).clone() for name in ENCODERS}
    trainer = Trainer(cfg, parts=parts)
    trainer.run()
    for name in ENCODERS:
        module = trainer.parts.modules()[name]
        weight = _table(module)
        assert weight.dtype == torch.float32, name  # the trainable tables stay fp32
        layers = [p for n, p in module.named_parameters() if ".layers." in n]
        assert layers and all(p.dtype == torch.bfloat16 for p in layers), name
        assert torch.equal(weight[: tables[name].shape[0]], tables[name]), name
    for file in (DIFFUSERS_FILE, DIFFUSERS_FILE_2):
        assert torch.isfinite(load_file(tmp_path / "run" / file)[TOKEN]).all()
