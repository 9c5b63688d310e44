"""Config sections by concept (prior, regularization, one per method), the old db/ti/hn keys
still accepted with one deprecation line, and the method list read from personalize/methods.

rename_config: keep old keys (the deprecation path is tested here on purpose)
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from personalize.config import METHODS, ConfigError, from_dict, load_config, method_names

ROOT = Path(__file__).resolve().parents[1]

OLD_YAML = """\
method: dreambooth
db:
  with_prior_preservation: true
  prior: distillation
  class_prompt: a dog
  prior_loss_weight: 0.5
  distillation_weight: 2.0
  sample_batch_size: 2
  class_num_inference_steps: 7
  class_guidance_scale: 4.0
  class_precision: no
  weight_constraint: l2sp
  weight_constraint_lambda: 0.001
  train_text_encoder: true
  stop_text_encoder_training: 5
  save_precision: fp16
ti:
  num_vectors: 2
hn:
  layer_norm: true
"""
OLD_OVERRIDES = ["db.num_class_images=3", "ti.save_every=4", "hn.activation=relu"]

NEW_YAML = """\
method: dreambooth
prior:
  enabled: true
  kind: distillation
  class_prompt: a dog
  loss_weight: 0.5
  distillation_weight: 2.0
  generation_batch_size: 2
  generation_steps: 7
  generation_guidance_scale: 4.0
  generation_precision: no
regularization:
  weight_constraint: l2sp
  weight_constraint_lambda: 0.001
dreambooth:
  train_text_encoder: true
  stop_text_encoder_training: 5
  save_precision: fp16
textual_inversion:
  num_vectors: 2
hypernetwork:
  layer_norm: true
"""
NEW_OVERRIDES = [
    "prior.num_class_images=3",
    "textual_inversion.save_every=4",
    "hypernetwork.activation=relu",
]


def _load(tmp_path, text: str, overrides: list[str]):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, overrides)


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated config keys" in r.getMessage()]


def test_new_section_names_load(tmp_path):
    cfg = _load(tmp_path, NEW_YAML, NEW_OVERRIDES)
    assert cfg.prior.enabled and cfg.prior.kind == "distillation"
    assert cfg.prior.loss_weight == 0.5 and cfg.prior.num_class_images == 3
    assert cfg.prior.generation_steps == 7 and cfg.prior.generation_precision == "no"
    assert cfg.regularization.weight_constraint == "l2sp"
    assert cfg.dreambooth.train_text_encoder and cfg.dreambooth.save_precision == "fp16"
    assert cfg.textual_inversion.num_vectors == 2 and cfg.textual_inversion.save_every == 4
    assert cfg.hypernetwork.layer_norm and cfg.hypernetwork.activation == "relu"
    assert not hasattr(cfg, "db") and not hasattr(cfg, "ti") and not hasattr(cfg, "hn")


def test_old_keys_give_the_same_config_with_one_deprecation_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="personalize.config"):
        new = _load(tmp_path, NEW_YAML, NEW_OVERRIDES)
    assert _deprecations(caplog) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="personalize.config"):
        old = _load(tmp_path, OLD_YAML, OLD_OVERRIDES)
    # The whole run is decided by the config, and the saved config.yaml is its to_dict.
    assert old == new and old.to_dict() == new.to_dict()
    (line,) = _deprecations(caplog)  # one line for the YAML's and the overrides' old keys
    for pair in (
        "db.with_prior_preservation -> prior.enabled",
        "db.prior -> prior.kind",
        "db.class_num_inference_steps -> prior.generation_steps",
        "db.weight_constraint -> regularization.weight_constraint",
        "db.save_precision -> dreambooth.save_precision",
        "db.num_class_images -> prior.num_class_images",
        "ti.num_vectors -> textual_inversion.num_vectors",
        "ti.save_every -> textual_inversion.save_every",
        "hn.layer_norm -> hypernetwork.layer_norm",
    ):
        assert pair in line


def test_an_old_override_replaces_a_new_yaml_value_and_vice_versa(tmp_path):
    assert _load(tmp_path, NEW_YAML, ["db.prior_loss_weight=3"]).prior.loss_weight == 3.0
    assert _load(tmp_path, OLD_YAML, ["prior.loss_weight=3"]).prior.loss_weight == 3.0


def test_old_and_new_key_with_different_values_is_an_error():
    data = {"method": "lora", "db": {"prior_loss_weight": 2.0}, "prior": {"loss_weight": 1.0}}
    with pytest.raises(ConfigError, match=r"db\.prior_loss_weight .*prior\.loss_weight"):
        from_dict(data)
    data["prior"]["loss_weight"] = 2.0  # the same value twice is fine
    assert from_dict(data).prior.loss_weight == 2.0


def test_unknown_old_db_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): db\.rank"):
        from_dict({"db": {"rank": 4}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): textual_inversion\.rank"):
        from_dict({"ti": {"rank": 4}})


def test_each_section_checks_its_own_keys():
    cases = [
        ({"prior": {"kind": "images"}}, r"prior\.kind: must be class_images or distillation"),
        ({"prior": {"enabled": True}}, r"prior\.class_prompt"),
        ({"prior": {"kind": "distillation"}}, r"prior\.kind: .*prior\.enabled: true"),
        ({"regularization": {"weight_constraint": "l1"}}, r"regularization\.weight_constraint"),
        ({"textual_inversion": {"num_vectors": 0}}, r"textual_inversion\.num_vectors"),
        ({"hypernetwork": {"activation": "wiggle"}}, r"hypernetwork\.activation"),
        ({"dreambooth": {"save_precision": "fp8"}}, r"dreambooth\.save_precision"),
        ({"lora": {"rank": 0}}, r"lora\.rank"),
    ]
    for data, match in cases:
        with pytest.raises(ConfigError, match=match):
            from_dict({"method": "dreambooth", **data})


def test_dreambooth_section_is_refused_for_lora_and_prior_is_shared():
    with pytest.raises(ConfigError, match=r"dreambooth\.train_text_encoder .*lora\.train_text"):
        from_dict({"method": "lora", "dreambooth": {"train_text_encoder": True}})
    prior = {"enabled": True, "class_prompt": "a dog"}
    for method in ("lora", "dreambooth"):
        cfg = from_dict(
            {"method": method, "prior": prior, "regularization": {"weight_constraint": "l2sp"}}
        )
        assert cfg.prior.enabled and cfg.regularization.weight_constraint == "l2sp"


def test_shipped_configs_and_docs_use_the_new_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="personalize.config"):
        for path in sorted((ROOT / "configs").glob("*.yaml")):
            if path.stem in METHODS:
                load_config(path)
    assert _deprecations(caplog) == []


def test_method_list_is_read_from_the_methods_package():
    from personalize.methods import Method, get_method

    # Every module of methods/ but the interface and the building blocks methods share.
    shared = ("__init__", "base", "class_images", "pivotal", "prior", "regularizers")
    modules = {
        p.stem
        for p in (ROOT / "personalize" / "methods").glob("*.py")
        if p.stem not in shared and not p.stem.startswith("_")
    }
    assert set(METHODS) == set(method_names()) == modules
    for name in METHODS:
        cls = get_method(name)
        assert issubclass(cls, Method) and cls.name == name
    with pytest.raises(ConfigError, match=r"method: must be one of .*lora.*got 'lorra'"):
        from_dict({"method": "lorra"})


@pytest.mark.parametrize("method", METHODS)
def test_demo_and_benchmark_share_the_methods_toy_world_recipe(method, tmp_path):
    from personalize.demo import demo_config
    from personalize.toyworld import base_model_path
    from personalize.toyworld.recipes import subject_phrase, toy_recipe
    from personalize.toyworld.subjects import get_subject
    from personalize.toyworld.variants import ALL_RECIPES, variant_config

    heart = get_subject("striped_heart")
    recipe = toy_recipe(method, heart, base_model_path())
    demo = demo_config(method, tmp_path, recipe["steps"], "toy", heart.name)
    variant = next(v for v, r in ALL_RECIPES.items() if r["method"] == method)
    bench = variant_config(variant, heart, base_model_path(), tmp_path, tmp_path / "run")
    for cfg in (demo, bench):
        assert cfg["data"]["prompt"] == recipe["config"]["data"]["prompt"]
        for section, values in recipe["config"].items():
            for key, value in values.items():
                if section == "prior" and not cfg.get("prior", {}).get("enabled"):
                    continue  # the class prompt is for a prior only (benchmark: no-prior variant)
                assert cfg[section][key] == value, (section, key)
        from_dict(cfg)  # a valid config
    phrase = subject_phrase(demo["data"]["prompt"])
    assert phrase == ("<sks-heart>" if method == "textual_inversion" else "sks heart")


def test_a_run_with_old_keys_equals_a_run_with_new_keys(tiny_model_dir, instance_dir, tmp_path):
    """DreamBooth-LoRA with class images and L2-SP, once per spelling: the same weights."""
    from conftest import base_config
    from safetensors.torch import load_file

    from personalize import train

    prior = {"class_prompt": "a photo of a disc", "num_class_images": 2}
    old = {
        "db": {
            "with_prior_preservation": True,
            **prior,
            "sample_batch_size": 2,
            "class_num_inference_steps": 1,
            "weight_constraint": "l2sp",
            "weight_constraint_lambda": 0.01,
        }
    }
    new = {
        "prior": {"enabled": True, **prior, "generation_batch_size": 2, "generation_steps": 1},
        "regularization": {"weight_constraint": "l2sp", "weight_constraint_lambda": 0.01},
    }
    weights = []
    for name, sections in (("old", old), ("new", new)):
        cfg = base_config(tiny_model_dir, instance_dir, tmp_path / name, **sections)
        cfg["train"]["max_steps"] = 2
        cfg["prior"] = {**cfg.get("prior", {}), "class_data_dir": str(tmp_path / f"class_{name}")}
        run_dir = train(from_dict(cfg))
        (artifact,) = sorted(Path(run_dir).rglob("*.safetensors"))[:1]
        weights.append(load_file(artifact))
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
