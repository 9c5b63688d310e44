"""Textual Inversion: only the new rows train, the files load everywhere, bad inputs say why."""

from __future__ import annotations

import logging
import os
import subprocess

import numpy as np
import pytest
import torch
import yaml
from conftest import base_config
from diffusers import StableDiffusionPipeline
from helpers import ROOT, launch_two_processes
from safetensors.torch import load_file, save_file

from personalize import load, train
from personalize.adapters.embeddings import (
    DIFFUSERS_FILE,
    Embedding,
    EmbeddingError,
    expand_prompt,
    read_embedding,
    save_embedding,
)
from personalize.config import ConfigError, from_dict
from personalize.data import DataError
from personalize.inference import ArtifactError, detect_artifact, generate
from personalize.methods.textual_inversion import STATE_KEY, TextualInversion
from personalize.models import load_parts
from personalize.training import checkpoint as ckpt
from personalize.training.loop import Trainer

TOKEN = "<sks-disc>"
PROMPT = f"a photo of {TOKEN}"
OTHER = "a photo of a dog"
TI = {"placeholder_token": TOKEN, "initializer_token": "o", "num_vectors": 2}


def _cfg(model_dir, data_dir, out, **sections):
    sections.setdefault("ti", TI)
    return from_dict(base_config(model_dir, data_dir, out, method="textual_inversion", **sections))


def _pipe(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, prompt):
    return np.stack(
        [
            np.asarray(im, dtype=np.float32)
            for im in generate(pipe, [prompt], [0], num_inference_steps=3, resolution=32)[0]
        ]
    )


def _prompt_embeds(pipe, prompt):
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.fixture(scope="module")
def ti_run(tiny_model_dir, instance_dir, tmp_path_factory):
    """4 steps with a large LR and weight decay (which touches every row of the table)."""
    out = tmp_path_factory.mktemp("ti") / "run"
    cfg = _cfg(
        tiny_model_dir,
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
    parts = load_parts(str(tiny_model_dir))
    base = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in parts.modules().items()
    }
    trainer = Trainer(cfg, parts=parts)
    trainer.run()
    return out, trainer, base


def test_only_the_placeholder_rows_change(ti_run):
    _, trainer, base = ti_run
    parts, ids = trainer.parts, trainer.method.ids
    table_key = next(k for k in base["text_encoder"] if k.endswith("token_embedding.weight"))
    old = base["text_encoder"][table_key]
    table = parts.text_encoder.get_input_embeddings().weight.detach()
    assert ids == [old.shape[0], old.shape[0] + 1]  # appended after the base vocabulary
    assert torch.equal(table[: old.shape[0]], old)  # bit for bit, despite weight decay
    assert not torch.equal(
        table[ids], trainer.method.rows["text_encoder"]._original[ids]
    )  # the new rows learned
    for name in ("unet", "vae", "text_encoder"):
        for key, value in parts.modules()[name].state_dict().items():
            if key != table_key:
                assert torch.equal(value, base[name][key]), f"{name}.{key}"


def test_saved_files_hold_the_trained_rows(ti_run):
    out, trainer, _ = ti_run
    trained = trainer.method.vectors(trainer.parts)
    diffusers_file = load_file(out / DIFFUSERS_FILE)
    assert list(diffusers_file) == [TOKEN] and diffusers_file[TOKEN].shape == (2, 32)
    assert torch.equal(diffusers_file[TOKEN], trained)
    webui = torch.load(out / "sks-disc.pt", weights_only=True)
    assert webui["name"] == "sks-disc" and webui["step"] == 4
    assert webui["string_to_token"] == {"*": 265}
    assert torch.equal(webui["string_to_param"]["*"], trained)
    assert torch.equal(load_file(out / "sks-disc.safetensors")["emb_params"], trained)
    # Intermediate embeddings every textual_inversion.save_every steps; the last equals the final
    # one.
    step2 = load_file(out / "learned_embeds-steps-2.safetensors")[TOKEN]
    assert not torch.equal(step2, trained)
    assert torch.equal(load_file(out / "learned_embeds-steps-4.safetensors")[TOKEN], trained)
    # Validation samples, with {} in the prompt standing for the token.
    assert trainer.validation_prompts == [f"{TOKEN} on a table"]
    assert trainer.cfg.validation.prompts == ["{} on a table"]  # the config stays as given
    assert (out / "samples" / "step-000004.png").is_file()


def test_stock_diffusers_loads_every_file_and_only_prompts_with_the_token_change(
    ti_run, tiny_model_dir
):
    out, trainer, _ = ti_run
    base = _pipe(tiny_model_dir)
    before, before_other = _images(base, PROMPT), _images(base, OTHER)

    pipe = _pipe(tiny_model_dir)
    pipe.load_textual_inversion(out)  # the folder: learned_embeds.safetensors
    # The fresh pipeline encodes the prompt exactly as the trained text encoder did.
    ids = trainer.parts.tokenizer(
        expand_prompt(PROMPT, TOKEN, 2), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        trained = trainer.parts.text_encoder(ids)[0]
    assert torch.allclose(_prompt_embeds(pipe, PROMPT), trained, atol=1e-6)
    assert np.abs(_images(pipe, PROMPT) - before).mean() > 1.0
    assert np.array_equal(_images(pipe, OTHER), before_other)

    for name in ("sks-disc.pt", "sks-disc.safetensors"):
        webui = _pipe(tiny_model_dir)
        webui.load_textual_inversion(str(out / name), token=TOKEN)
        assert torch.equal(_prompt_embeds(webui, PROMPT), _prompt_embeds(pipe, PROMPT)), name


def test_personalize_load_folder_and_webui_file(ti_run, tiny_model_dir, caplog):
    out, *_ = ti_run
    stock = _pipe(tiny_model_dir)
    stock.load_textual_inversion(out)
    expected = _prompt_embeds(stock, PROMPT)
    assert detect_artifact(out) == "textual_inversion"
    pipe = load(_pipe(tiny_model_dir), out)
    assert torch.equal(_prompt_embeds(pipe, PROMPT), expected)
    # A webui file's trigger word is its file name, as in the webui.
    webui = load(_pipe(tiny_model_dir), out / "sks-disc.pt")
    assert torch.equal(_prompt_embeds(webui, "a photo of sks-disc"), expected)
    # A prompt without the token gets a warning (once) instead of silently doing nothing.
    with caplog.at_level(logging.WARNING, logger="personalize.adapters.embedding_load"):
        _prompt_embeds(pipe, OTHER)
        _prompt_embeds(pipe, OTHER)
    warnings = [r for r in caplog.records if "does not contain the embedding token" in r.message]
    assert len(warnings) == 1 and TOKEN in warnings[0].getMessage()


def test_loading_twice_needs_another_token(ti_run, tiny_model_dir):
    out, *_ = ti_run
    pipe = load(_pipe(tiny_model_dir), out)
    with pytest.raises(ArtifactError, match="adapter_name"):
        load(pipe, out)
    load(pipe, out, adapter_name="<second>")
    assert torch.equal(_prompt_embeds(pipe, "a photo of <second>"), _prompt_embeds(pipe, PROMPT))
    with pytest.raises(ArtifactError, match="no strength"):
        load(_pipe(tiny_model_dir), out, strength=0.5)


# ------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_diffusers_webui_round_trip_is_exact(tmp_path, num_vectors):
    vectors = torch.randn(num_vectors, 768)
    first = tmp_path / "learned_embeds.safetensors"
    save_embedding(Embedding(vectors, "<cat-toy>", layout="diffusers"), first)
    emb = read_embedding(first)
    assert emb.token == "<cat-toy>" and emb.layout == "diffusers"
    save_embedding(Embedding(emb.vectors, "cattoy", step=7, layout="webui"), tmp_path / "a.pt")
    pt = read_embedding(tmp_path / "a.pt")
    assert pt.layout == "webui" and pt.token == "a" and pt.step == 7  # token = file name
    save_embedding(pt, tmp_path / "cattoy.safetensors")
    single = read_embedding(tmp_path / "cattoy.safetensors")
    assert single.layout == "single_tensor" and single.token == "a"  # the name travels along
    save_embedding(Embedding(single.vectors, "<cat-toy>"), tmp_path / "back.safetensors")
    for path in (tmp_path / "a.pt", tmp_path / "cattoy.safetensors", tmp_path / "back.safetensors"):
        assert torch.equal(read_embedding(path).vectors, vectors), path
    assert list(load_file(tmp_path / "back.safetensors")) == ["<cat-toy>"]


def test_reads_embeddings_made_elsewhere(tmp_path, tiny_model_dir):
    # A webui file as the webui writes it (a Parameter inside), a kohya file, a bare tensor.
    vec = torch.randn(3, 32)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vec)},
            "name": "SomethingElse",
            "step": 500,
            "sd_checkpoint": "abcd1234",
            "sd_checkpoint_name": "v1-5",
        },
        tmp_path / "mystyle.pt",
    )
    save_file({"emb_params": vec[:1].clone()}, str(tmp_path / "kohya.safetensors"))
    torch.save(vec[0].clone(), tmp_path / "bare.bin")
    webui = read_embedding(tmp_path / "mystyle.pt")
    assert (webui.token, webui.num_vectors, webui.step) == ("mystyle", 3, 500)
    assert read_embedding(tmp_path / "kohya.safetensors").token == "kohya"
    assert read_embedding(tmp_path / "bare.bin").vectors.shape == (1, 32)
    pipe = _pipe(tiny_model_dir)
    for name in ("mystyle.pt", "kohya.safetensors", "bare.bin"):
        assert detect_artifact(tmp_path / name) == "textual_inversion"
        load(pipe, tmp_path / name)
    # A multi-vector token expands in the prompt exactly as diffusers' own loader does.
    assert (
        pipe.maybe_convert_prompt("a mystyle cat", pipe.tokenizer)
        == "a mystyle mystyle_1 mystyle_2 cat"
    )
    rows = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["mystyle", "mystyle_1", "mystyle_2"])
    assert torch.equal(rows[ids], vec)
    # Pickles are opened with weights_only: a file holding a module is refused, saying why.
    torch.save(
        {"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)})},
        tmp_path / "old.pt",
    )
    with pytest.raises(ArtifactError, match="cannot be loaded safely.*ParameterDict"):
        load(pipe, tmp_path / "old.pt")


def test_wrong_width_and_sdxl_files_are_clear_errors(tmp_path, tiny_model_dir):
    save_file({"<sd15>": torch.randn(2, 768)}, str(tmp_path / "sd15.safetensors"))
    save_file(
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
        str(tmp_path / "xl_emb.safetensors"),
    )
    pipe = _pipe(tiny_model_dir)
    with pytest.raises(ArtifactError, match=r"width 768 \(SD 1.x.*width 32"):
        load(pipe, tmp_path / "sd15.safetensors")
    with pytest.raises(ArtifactError, match="SDXL embedding"):
        load(pipe, tmp_path / "xl_emb.safetensors")
    assert "<sd15>" not in pipe.tokenizer.get_vocab()  # nothing half-loaded
    save_file({"a": torch.randn(2, 32), "b": torch.randn(2, 32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(EmbeddingError, match="expected one tensor"):
        read_embedding(tmp_path / "two.safetensors")


# ------------------------------------------------------------------------------ bad inputs


def _setup(tiny_model_dir, instance_dir, tmp_path, **ti):
    cfg = _cfg(tiny_model_dir, instance_dir, tmp_path / "run", ti=dict(TI, **ti))
    method = TextualInversion(cfg)
    parts = load_parts(str(tiny_model_dir))
    return method, method.setup(parts), parts


def test_placeholder_already_in_vocabulary(tiny_model_dir, instance_dir, tmp_path):
    for taken in ("x", "<|endoftext|>"):
        with pytest.raises(
            ConfigError, match=r"textual_inversion\.placeholder_token.*already in the token"
        ):
            _setup(tiny_model_dir, instance_dir, tmp_path, placeholder_token=taken)
    with pytest.raises(ConfigError, match=r"textual_inversion\.placeholder_token.*without spaces"):
        _setup(tiny_model_dir, instance_dir, tmp_path, placeholder_token="my cat")


def test_initializer_of_several_tokens(tiny_model_dir, instance_dir, tmp_path):
    # "cat" is three tokens for the byte-level tokenizer (c, a, t</w>).
    with pytest.raises(
        ConfigError,
        match=r"textual_inversion\.initializer_token: 'cat' is 3 tokens.*"
        r"textual_inversion\.num_vectors=3",
    ):
        _setup(tiny_model_dir, instance_dir, tmp_path, initializer_token="cat", num_vectors=2)
    # ... which is fine when every vector gets one piece (the webui's rule).
    method, groups, parts = _setup(
        tiny_model_dir, instance_dir, tmp_path, initializer_token="cat", num_vectors=3
    )
    table = groups[0]["params"][0]
    pieces = parts.tokenizer.encode("cat", add_special_tokens=False)
    assert torch.equal(table[method.ids], table[pieces])
    with pytest.raises(ConfigError, match=r"textual_inversion\.initializer_token.*empty"):
        _setup(tiny_model_dir, instance_dir, tmp_path, initializer_token=" ")


def test_missing_token_in_templates_and_captions(tiny_model_dir, instance_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"textual_inversion\.templates\[1\].*no \{\}"):
        _cfg(
            tiny_model_dir,
            instance_dir,
            tmp_path / "a",
            ti=dict(TI, templates=["a photo of {}", "a photo"]),
        )
    # Captions mode: the data.prompt used for every uncaptioned image lacks the token.
    cfg = _cfg(
        tiny_model_dir,
        instance_dir,
        tmp_path / "b",
        data={"prompt": "a photo of a disc"},
        ti=dict(TI, learnable_property="caption"),
    )
    with pytest.raises(DataError, match=r"4 caption\(s\) do not contain the placeholder"):
        Trainer(cfg)


# ------------------------------------------------------------------------------ captions


def test_captions_templates_and_multi_vector_expansion(tiny_model_dir, instance_dir, tmp_path):
    cfg = _cfg(
        tiny_model_dir,
        instance_dir,
        tmp_path / "run",
        data={"prompt": None},
        ti=dict(TI, learnable_property="style"),
        validation={"prompts": ["{} at night"], "every_steps": 5},
    )
    trainer = Trainer(cfg)
    # Filled in for the data and the samples; the config itself stays as given.
    assert trainer.train_dataset.instance_prompt == f"a painting in the style of {TOKEN}"
    assert trainer.validation_prompts == [f"{TOKEN} at night"]
    assert cfg.data.prompt is None and cfg.validation.prompts == ["{} at night"]
    ds = trainer.dataloader.dataset
    captions = [[ds[i]["caption"] for i in range(len(ds))] for _ in range(2)]
    assert captions[0] == captions[1]  # a function of (seed, epoch, index), not of RNG state
    assert all(c.count(f"{TOKEN} {TOKEN}_1") == 1 and "style of" in c for c in captions[0])
    trainer.train_dataset.set_epoch(1)
    assert [ds[i]["caption"] for i in range(len(ds))] != captions[0]
    # Captions mode: {} is the token; the validation dataset uses the same function.
    fn = TextualInversion(
        _cfg(
            tiny_model_dir, instance_dir, tmp_path / "c", ti=dict(TI, learnable_property="caption")
        )
    ).caption_fn()
    assert fn("{} on a table") == f"{TOKEN} {TOKEN}_1 on a table"
    assert fn("") == ""  # caption dropout stays unconditional
    with pytest.raises(DataError, match="does not contain the placeholder"):
        fn("a disc on a table")


# ------------------------------------------------------------------------------ the loop


def test_resume_gives_identical_embeddings(tiny_model_dir, instance_dir, tmp_path):
    # Batch 1 over 4 images: the checkpoint at step 3 is mid-epoch, and every example draws
    # its own template and flip.
    common = dict(
        train={"max_steps": 5, "checkpoint_every": 3, "lr": 0.02, "batch_size": 1},
        data={"random_flip": True},
    )
    straight = train(_cfg(tiny_model_dir, instance_dir, tmp_path / "a", **common))
    first = dict(common, train=dict(common["train"], max_steps=3))
    train(_cfg(tiny_model_dir, instance_dir, tmp_path / "b", **first))
    checkpoint = ckpt.complete_checkpoints(tmp_path / "b")[-1]
    state = load_file(checkpoint / ckpt.TRAINABLE_FILE)
    assert list(state) == [STATE_KEY] and state[STATE_KEY].shape == (2, 32)  # rows, not table
    trainer = Trainer(_cfg(tiny_model_dir, instance_dir, tmp_path / "b", resume="latest", **common))
    trainer.run()
    assert trainer.global_step == 5
    a = load_file(straight / DIFFUSERS_FILE)[TOKEN]
    b = load_file(tmp_path / "b" / DIFFUSERS_FILE)[TOKEN]
    assert torch.equal(a, b)


@pytest.fixture
def fresh_accelerate_state():
    """The accelerate state is a process-wide singleton fixed at the first precision used."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_keeps_rows_exact(
    tiny_model_dir, instance_dir, tmp_path, fresh_accelerate_state, monkeypatch
):
    # A CPU run falls back from bf16 to fp32 (CPU bf16 autocast works but is far slower);
    # keep bf16 here: the bf16 path is what this test checks.
    monkeypatch.setattr(
        "personalize.training.accelerator.runtime_precision", lambda requested, *_, **__: requested
    )
    # With the other memory saver of large runs, gradient checkpointing, on as well.
    cfg = _cfg(
        tiny_model_dir,
        instance_dir,
        tmp_path / "run",
        train={
            "max_steps": 2,
            "mixed_precision": "bf16",
            "weight_decay": 0.5,
            "gradient_checkpointing": True,
        },
    )
    parts = load_parts(str(tiny_model_dir))
    table = parts.text_encoder.get_input_embeddings().weight.detach().clone()
    trainer = Trainer(cfg, parts=parts)
    trainer.run()
    weight = trainer.parts.text_encoder.get_input_embeddings().weight
    assert weight.dtype == torch.float32  # the trainable table stays fp32
    assert next(trainer.parts.text_encoder.encoder.parameters()).dtype == torch.bfloat16
    # The bf16 cast rounded the table; the restore puts the exact fp32 rows back.
    assert torch.equal(weight.detach()[: table.shape[0]], table)
    assert torch.isfinite(load_file(tmp_path / "run" / DIFFUSERS_FILE)[TOKEN]).all()


def test_two_process_cpu_run(tiny_model_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            base_config(
                tiny_model_dir,
                instance_dir,
                out,
                method="textual_inversion",
                ti=TI,
                train={"max_steps": 2, "checkpoint_every": 2},
            )
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        launch_two_processes("personalize", "train", str(cfg_path)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    assert proc.stdout.count("artifact saved in") == 1  # printed by the main rank only
    vectors = load_file(out / DIFFUSERS_FILE)[TOKEN]
    state = load_file(ckpt.complete_checkpoints(out)[-1] / ckpt.TRAINABLE_FILE)
    assert torch.equal(state[STATE_KEY], vectors)
    assert read_embedding(out / "sks-disc.pt").num_vectors == 2
