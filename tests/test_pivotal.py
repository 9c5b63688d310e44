"""Pivotal tuning: a new token's embedding trained beside a LoRA (or DreamBooth). Only the
new rows change, the embedding stops at pivotal.stop_after, the files load into stock
diffusers and through personalize.load, and a resumed run is bit-identical."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import base_config
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from personalize import load, train
from personalize.adapters.clients import client_guide
from personalize.adapters.embeddings import DIFFUSERS_FILE, read_embedding
from personalize.config import ConfigError, PivotalConfig, from_dict
from personalize.data import DataError
from personalize.inference import generate
from personalize.methods.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
from personalize.methods.pivotal import TRAINING_KEY
from personalize.methods.textual_inversion import STATE_KEY
from personalize.models import load_parts
from personalize.training import checkpoint as ckpt

TOKEN = "<sks-disc>"
PROMPT = f"a photo of {TOKEN}"
TI = {"placeholder_token": TOKEN, "initializer_token": "o", "num_vectors": 2}
TABLE = "token_embedding.weight"


def _cfg(model_dir, data_dir, out, pivotal=None, **sections):
    sections.setdefault("textual_inversion", TI)
    sections.setdefault("data", {"prompt": PROMPT})
    return from_dict(
        base_config(
            model_dir,
            data_dir,
            out,
            pivotal={"enabled": True, "learning_rate": 5e-2, **(pivotal or {})},
            **sections,
        )
    )


def _pipe(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompt=PROMPT):
    return np.stack(
        [
            np.asarray(im, dtype=np.float32)
            for im in generate(pipe, [prompt], [0], num_inference_steps=3, resolution=32)[0]
        ]
    )


def _run(model_dir, data_dir, out, **kw):
    parts = load_parts(str(model_dir))
    train(_cfg(model_dir, data_dir, out, **kw), parts=parts)
    return parts


def _rows(parts, n=2):
    ids = parts.tokenizer.convert_tokens_to_ids([TOKEN] + [f"{TOKEN}_{i}" for i in range(1, n)])
    return parts.text_encoder.get_input_embeddings().weight[ids].detach().clone()


def _lora(parts):
    return {k: v.clone() for k, v in parts.unet.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def pivotal_run(tiny_model_dir, instance_dir, tmp_path_factory):
    """6 steps, weight decay on (AdamW's decay touches every row of the table)."""
    out = tmp_path_factory.mktemp("pivotal") / "run"
    base = load_parts(str(tiny_model_dir))
    base_unet = {k: v.clone() for k, v in base.unet.state_dict().items()}
    base_table = base.text_encoder.get_input_embeddings().weight.detach().clone()
    base_te = {k: v.clone() for k, v in base.text_encoder.state_dict().items()}
    parts = _run(tiny_model_dir, instance_dir, out, train={"max_steps": 6, "weight_decay": 0.5})
    return out, parts, base_unet, base_table, base_te


def test_only_the_new_rows_and_the_lora_change(pivotal_run):
    _, parts, base_unet, base_table, base_te = pivotal_run
    table = parts.text_encoder.get_input_embeddings().weight.detach()
    n = base_table.shape[0]
    assert torch.equal(table[:n], base_table)  # every row of the base vocabulary, bit for bit
    ids = parts.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    o = parts.tokenizer.convert_tokens_to_ids("o")
    assert not torch.equal(table[ids], base_table[[o, o]])  # the new rows learned
    for key, value in parts.text_encoder.state_dict().items():
        if TABLE not in key:
            assert torch.equal(value, base_te[key]), key
    trained = parts.unet.state_dict()
    for key, value in base_unet.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(trained.get(key, trained.get(peft_key)), value), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())


def test_saved_files_load_into_a_stock_pipeline_and_change_the_output(pivotal_run, tiny_model_dir):
    out, parts, *_ = pivotal_run
    for name in (
        LORA_WEIGHTS,
        KOHYA_WEIGHTS,
        DIFFUSERS_FILE,
        "sks-disc.safetensors",
        "sks-disc.pt",
    ):
        assert (out / name).is_file(), name
    learned = _rows(parts)
    for name in (DIFFUSERS_FILE, "sks-disc.safetensors", "sks-disc.pt"):
        assert torch.equal(read_embedding(out / name).vectors, learned), name
    pipe = _pipe(tiny_model_dir)
    base = _images(pipe, "a photo of a disc")
    pipe.load_lora_weights(str(out), weight_name=LORA_WEIGHTS)
    pipe.load_textual_inversion(str(out / DIFFUSERS_FILE))
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), learned)
    assert np.abs(_images(pipe) - base).max() > 0


def test_personalize_load_loads_lora_and_embedding_and_warns_without_token(
    pivotal_run, tiny_model_dir, caplog
):
    out, parts, *_ = pivotal_run
    stock = _pipe(tiny_model_dir)
    stock.load_lora_weights(str(out), weight_name=LORA_WEIGHTS)
    stock.load_textual_inversion(str(out / DIFFUSERS_FILE))
    pipe = _pipe(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="personalize"):
        load(pipe, out)
    assert any(TOKEN in r.getMessage() and "prompt" in r.getMessage() for r in caplog.records)
    assert pipe.get_list_adapters()["unet"]
    assert np.allclose(_images(pipe), _images(stock), atol=1e-4)
    load(pipe, out)  # a second load (a re-run cell) replaces both instead of failing
    assert np.allclose(_images(pipe), _images(stock), atol=1e-4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="personalize"):
        _images(pipe, "a photo of a disc")
    assert any("does not contain the embedding token" in r.getMessage() for r in caplog.records)


def test_the_embedding_stops_at_stop_after_and_resume_is_bit_identical(
    tiny_model_dir, instance_dir, tmp_path
):
    common = dict(
        pivotal={"stop_after": 0.5},
        train={"max_steps": 4, "checkpoint_every": 1, "checkpoints_total_limit": 4},
    )
    two = _run(tiny_model_dir, instance_dir, tmp_path / "two", train={"max_steps": 2})
    straight = _run(tiny_model_dir, instance_dir, tmp_path / "straight", **common)
    # Steps 1-2 are the same in both runs: the rows after step 2 are the rows at the end.
    assert torch.equal(_rows(straight), _rows(two))
    lora_two = _lora(two)
    assert any(not torch.equal(v, lora_two[k]) for k, v in _lora(straight).items())  # LoRA on
    state = load_file(tmp_path / "straight" / "checkpoints" / "step-000001" / ckpt.TRAINABLE_FILE)
    assert state[STATE_KEY].shape == (2, 32) and not any(TABLE in k for k in state)
    assert state[TRAINING_KEY].item() == 1.0
    state = load_file(tmp_path / "straight" / "checkpoints" / "step-000003" / ckpt.TRAINABLE_FILE)
    assert state[TRAINING_KEY].item() == 0.0
    # Resumed before the stop (the embedding's optimizer state matters) and after it (the
    # embedding must not move again).
    for step in (1, 3):
        out = tmp_path / f"resumed-{step}"
        checkpoint = tmp_path / "straight" / "checkpoints" / f"step-{step:06d}"
        resumed = _run(tiny_model_dir, instance_dir, out, resume=str(checkpoint), **common)
        assert torch.equal(_rows(resumed), _rows(straight)), step
        lora = _lora(straight)
        assert all(torch.equal(v, lora[k]) for k, v in _lora(resumed).items()), step
        assert torch.equal(
            load_file(out / DIFFUSERS_FILE)[TOKEN],
            load_file(tmp_path / "straight" / DIFFUSERS_FILE)[TOKEN],
        )


def test_stop_after_reads_fractions_and_steps():
    assert PivotalConfig(stop_after=0.5).stop_step(10) == 5
    assert PivotalConfig(stop_after=0.01).stop_step(10) == 1
    assert PivotalConfig(stop_after=3).stop_step(10) == 3
    assert PivotalConfig().stop_step(10) is None


def test_dreambooth_with_pivotal_saves_pipeline_and_embedding(
    tiny_model_dir, instance_dir, tmp_path
):
    out = tmp_path / "db"
    base_table = load_parts(str(tiny_model_dir)).text_encoder.get_input_embeddings().weight
    parts = _run(
        tiny_model_dir, instance_dir, out, method="dreambooth", train={"max_steps": 2, "lr": 1e-4}
    )
    table = parts.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[: base_table.shape[0]], base_table.detach())
    assert (out / "model_index.json").is_file() and (out / DIFFUSERS_FILE).is_file()
    pipe = _pipe(tiny_model_dir)
    load(pipe, out)
    assert TOKEN in pipe.tokenizer.get_vocab()
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), _rows(parts))


def test_a_token_that_would_overwrite_the_lora_file_is_refused(tmp_path):
    from personalize.methods.lora import LoRA

    cfg = from_dict(
        {
            "pivotal": {"enabled": True},
            "textual_inversion": {"placeholder_token": "lora_kohya"},
        }
    )
    with pytest.raises(ConfigError, match=r"placeholder_token.*overwrite.*lora_kohya"):
        _ = LoRA(cfg).embedding


def test_captions_without_the_token_are_refused_before_training(
    tiny_model_dir, instance_dir, tmp_path
):
    with pytest.raises(DataError, match=r"pivotal\.enabled"):
        _run(tiny_model_dir, instance_dir, tmp_path / "r", data={"prompt": "a photo of a disc"})


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"method": "textual_inversion", "pivotal": {"enabled": True}}, r"pivotal\.enabled"),
        ({"pivotal": {"stop_after": 0.5}}, r"pivotal\.stop_after is read only with"),
        ({"pivotal": {"enabled": True, "stop_after": 1.5}}, r"pivotal\.stop_after"),
        ({"pivotal": {"enabled": True, "learning_rate": 0}}, r"pivotal\.learning_rate"),
        (
            {"pivotal": {"enabled": True}, "textual_inversion": {"templates": ["a {}"]}},
            r"textual_inversion\.templates is not read by pivotal",
        ),
        (
            {
                "method": "dreambooth",
                "pivotal": {"enabled": True},
                "dreambooth": {"train_text_encoder": True},
            },
            r"pivotal\.enabled.*dreambooth\.train_text_encoder",
        ),
    ],
)
def test_config_errors_are_one_line(sections, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(sections)
    assert "\n" not in str(info.value)


def test_client_guide_says_which_file_goes_where(tmp_path):
    line = client_guide("pivotal", tmp_path, stem="sks-disc", token=TOKEN)
    assert "sks-disc.safetensors -> ComfyUI models/embeddings" in line
    assert "learned_embeds.safetensors -> diffusers" in line and TOKEN in line


def test_benchmark_variant_names_the_subject_with_a_token(tmp_path):
    from personalize.toyworld import base_model_path
    from personalize.toyworld.recipes import subject_phrase
    from personalize.toyworld.subjects import get_subject
    from personalize.toyworld.variants import VARIANTS, variant_config

    assert "pivotal" in VARIANTS
    cfg_dict = variant_config(
        "pivotal", get_subject("striped_heart"), base_model_path(), tmp_path / "d", tmp_path / "o"
    )
    cfg = from_dict(cfg_dict)
    assert cfg.method == "lora" and cfg.pivotal.enabled and cfg.pivotal.stop_after == 0.5
    assert cfg.data.prompt == "a <sks-heart>" and subject_phrase(cfg.data.prompt) == "<sks-heart>"
    assert cfg.textual_inversion.placeholder_token == "<sks-heart>"
    assert cfg.textual_inversion.initializer_token == "heart"
