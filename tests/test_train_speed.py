"""The speed benchmark's pieces that need no run: the numbers it derives from step stamps,
and that both trainers get the same settings (ours through a config that must parse)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import ROOT

from personalize.config import from_dict


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location(
        "train_speed", ROOT / "benchmarks" / "train_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steady_rate_leaves_out_warmup_and_first_step_counts_from_launch(speed):
    stamps = [110.0, 111.0, 111.5, 112.0, 112.5, 113.0]  # slow first steps, then 2 it/s
    out = speed.summarize_run({"stamps": stamps, "peak_rss_bytes": 5}, launched=100.0, warmup=1)
    assert out["first_step_seconds"] == 10.0
    assert out["steady_it_per_s"] == pytest.approx(2.0)
    assert out["median_step_it_per_s"] == pytest.approx(2.0)
    assert out["peak_memory_bytes"] == 5
    # On CUDA the events, not the host stamps (which only say when work was queued), count.
    gpu = {
        "stamps": stamps,
        "peak_rss_bytes": 5,
        "max_memory_allocated": 7,
        "gpu_seconds_since_first": [0.0, 0.5, 0.75, 1.0, 1.25, 1.5],
    }
    out = speed.summarize_run(gpu, launched=100.0, warmup=1)
    assert out["steady_it_per_s"] == pytest.approx(4.0) and out["peak_memory_bytes"] == 7


def test_summary_takes_medians_and_the_fastest_step(speed):
    runs = {
        "ours": [
            {"steady_it_per_s": 2.0, "step_seconds": [0.5, 0.4]},
            {"steady_it_per_s": 4.0, "step_seconds": [0.25, 0.3]},
            {"steady_it_per_s": 3.0, "step_seconds": [0.5]},
        ],
        "reference": [{"steady_it_per_s": 1.5, "step_seconds": [0.5]}, {"error": "exit 1"}],
    }
    summary = speed.summarize(runs)
    speed.add_ratios(summary)
    assert summary["ours"]["steady_it_per_s"] == 3.0
    assert summary["ours"]["fastest_step_it_per_s"] == 4.0
    assert summary["ratio_ours_over_reference"]["steady_it_per_s"] == 2.0
    assert summary["ratio_ours_over_reference"]["first_step_seconds"] is None
    assert summary["reference"]["failed_runs"] == 1 and summary["ours"]["failed_runs"] == 0


@pytest.mark.parametrize("method", ["lora", "textual_inversion", "dreambooth"])
def test_both_trainers_get_the_same_settings(speed, method, tmp_path):
    args = speed.parse_args(
        [
            "--method",
            method,
            "--only",
            "ours",
            "--resolution",
            "48",
            "--batch-size",
            "3",
            "--steps",
            "7",
            "--mixed-precision",
            "bf16",
            "--gradient-checkpointing",
        ]
    )
    cfg = speed.ours_config(
        args, tmp_path / "m", tmp_path / "d", tmp_path / "o", {"train.channels_last": True}
    )
    parsed = from_dict(cfg)  # a renamed config key would break the benchmark: caught here
    t = parsed.train
    assert (t.resolution, t.batch_size, t.max_steps, t.mixed_precision) == (48, 3, 7, "bf16")
    assert t.gradient_checkpointing and t.channels_last and t.lr == speed.LRS[method]
    args.reference = tmp_path / "ref.py"
    command = speed.reference_command(args, tmp_path / "m", tmp_path / "d", tmp_path / "o")
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--resolution"] == "48" and flags["--train_batch_size"] == "3"
    assert flags["--max_train_steps"] == "7" and flags["--mixed_precision"] == "bf16"
    assert float(flags["--learning_rate"]) == t.lr
    assert "--gradient_checkpointing" in command
    if method == "textual_inversion":
        # textual_inversion.py flips half the images: ours must flip too.
        assert (
            parsed.data.random_flip
            and parsed.textual_inversion.placeholder_token == speed.PLACEHOLDER
        )
    if method == "lora":
        assert flags["--rank"] == str(parsed.lora.rank)


def test_memory_options_reach_both_trainers(speed, tmp_path):
    """--use-8bit-adam and --cache map to our config and to the reference's flags; the
    latent cache only to a reference that has --cache_latents (train_dreambooth_lora_sdxl.py
    has not)."""
    reference = tmp_path / "train_dreambooth_lora_sdxl.py"
    reference.write_text('parser.add_argument("--use_8bit_adam")\n')
    argv = ["--method", "lora", "--model", "tiny-sdxl", "--reference", str(reference)]
    args = speed.parse_args([*argv, "--cache", "all", "--use-8bit-adam"])
    # The raw dict: parsing it would ask for bitsandbytes, which tests do not need.
    cfg = speed.ours_config(args, tmp_path / "m", tmp_path / "d", tmp_path / "o", {})
    assert cfg["train"]["optimizer"] == "adamw8bit"
    assert cfg["data"]["cache_latents"] and cfg["data"]["cache_text_embeddings"]
    command = speed.reference_command(args, tmp_path / "m", tmp_path / "d", tmp_path / "o")
    assert "--use_8bit_adam" in command and "--cache_latents" not in command
    reference.write_text('parser.add_argument("--cache_latents")\n')
    command = speed.reference_command(args, tmp_path / "m", tmp_path / "d", tmp_path / "o")
    assert "--cache_latents" in command

    args = speed.parse_args([*argv, "--cache", "none"])
    cfg = from_dict(speed.ours_config(args, tmp_path / "m", tmp_path / "d", tmp_path / "o", {}))
    assert cfg.train.optimizer == "adamw"
    assert not cfg.data.cache_latents and not cfg.data.cache_text_embeddings
    assert "--use_8bit_adam" not in speed.reference_command(
        args, tmp_path / "m", tmp_path / "d", tmp_path / "o"
    )
    with pytest.raises(SystemExit):  # there is no SDXL DreamBooth reference to run against
        speed.parse_args(["--method", "dreambooth", "--model", "sdxl", "--only", "ours"])


def test_sdxl_architecture_is_sdxl_base(speed):
    """The random-weight SDXL has SDXL base's parameter counts (known from its files)."""
    import sdxl_model

    counts = sdxl_model.estimate(rank=16)["parameters"]
    assert counts["unet"] == 2_567_463_684
    assert counts["text_encoder"] == 123_060_480
    assert counts["text_encoder_2"] == 694_659_840
    assert counts["vae"] == 83_653_863


def test_tiny_sdxl_runs_ours_end_to_end(speed, tmp_path):
    """Two steps of our trainer on the tiny SDXL through step_timer: the SDXL path of the
    benchmark (model folder, config, FLOP count with SDXL's added conditioning) works."""
    out = tmp_path / "result.json"
    result = speed.main(
        [
            "--method",
            "lora",
            "--model",
            "tiny-sdxl",
            "--only",
            "ours",
            "--device",
            "cpu",
            "--resolution",
            "32",
            "--batch-size",
            "1",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--num-images",
            "2",
            "--cache",
            "none",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    ours = result["summary"]["ours"]
    assert ours["failed_runs"] == 0 and result["runs"]["ours"][0]["steps"] == 2
    assert ours["peak_memory_bytes"] > 0 and result["unet_step_flops"] > 0
    assert json.loads(out.read_text())["model"] == "tiny-sdxl"
