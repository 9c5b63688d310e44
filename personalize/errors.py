"""Every exception the package raises for a user-facing condition, under one base.

`PersonalizeError` is what a caller (and the CLI) catches: its message is one line that says
what is wrong and how to fix it, and `exit_code` is what the CLI exits with. Each class also
derives from the builtin that callers caught before it existed (`ValueError` for bad input,
`RuntimeError` for a run that cannot go on, the `OSError` kinds for files), so
`except ValueError` keeps working.

This module is a leaf: it imports nothing of ours, so every layer can raise these.
"""

from __future__ import annotations


class PersonalizeError(Exception):
    """Base of the package's errors; the message is one line for the user."""

    exit_code = 2  # bad input: the CLI exits 2, like argparse does for a bad argument
    prefix = "error"  # the CLI prints "<prefix>: <message>"


# ---------------------------------------------------------------- bad input (exit 2)


class ConfigError(PersonalizeError, ValueError):
    """A config problem; the message names the dotted key and what would be valid."""


class PromptError(ConfigError):
    """The prompt file or template set cannot be used; the message says how to fix it."""


class DataError(PersonalizeError, ValueError):
    """A problem with the user's data. The message names the file at fault and the fix."""


class ModelLoadError(PersonalizeError, ValueError):
    """The model path is missing, not a Stable Diffusion model, or unreadable."""


class ArtifactError(PersonalizeError, ValueError):
    """The file is not a learned artifact we know, or does not fit this pipeline."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """The artifact path given to a loader does not exist."""


class EmbeddingError(ArtifactError):
    """An embedding file we cannot read, or one that does not fit the pipeline."""


class HypernetworkError(ArtifactError):
    """A hypernetwork file or setting we cannot use; the message says why."""


class LoraFileError(ArtifactError):
    """The file is not a plain LoRA this tool can read; the message says why."""


class KohyaExportError(PersonalizeError, ValueError):
    """These adapters cannot be written in the kohya layout; the message says why."""


class ConversionError(PersonalizeError, ValueError):
    """The weights do not fit the original SD 1.x layout; the message says which."""


class OutputExistsError(PersonalizeError, FileExistsError):
    """The output folder already holds something we must not overwrite."""


class OutputPermissionError(PersonalizeError, PermissionError):
    """The output folder cannot be written."""


class EvaluationError(PersonalizeError, ValueError):
    """Evaluation inputs (images, logs, results to merge) that cannot be used."""


# ------------------------------------------------------------ a run that stops (exit 1)


class TrainingError(PersonalizeError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to do."""

    exit_code = 1


class NonFiniteError(TrainingError):
    """The loss or gradients stayed non-finite (the loop turns it into advice)."""


class NonFiniteLatentsError(TrainingError):
    """The VAE encoded an image to NaN/inf latents (SDXL's VAE in fp16): never cached."""


class FastPathError(TrainingError):
    """A requested speed-up (compile, SDPA kernel, ...) cannot run here."""


class CheckpointError(PersonalizeError, RuntimeError):
    """A checkpoint could not be written or found; earlier checkpoints are untouched."""

    exit_code = 1


class CheckpointMismatch(CheckpointError, ValueError):
    """A checkpoint's trainable weights do not fit this run (another method, rank or model);
    the loop re-raises it as a TrainingError that says how to resume."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """`resume=` names a checkpoint that does not exist (bad input, so exit 2)."""

    exit_code = 2


class TrainingInterrupted(PersonalizeError, RuntimeError):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + signal."""

    prefix = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def need(ok: bool, key: str, msg: str) -> None:
    """The config validators' one check: raise `ConfigError("<key>: <msg>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
