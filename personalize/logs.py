"""Keep the console to what matters: our lines, once, and the other libraries' warnings.

The library never configures logging output (no `basicConfig`, no handlers): only the CLI
does (`configure_cli_logging`). What the library does do is drop a few exact messages from
diffusers/transformers/accelerate that say nothing to a user of personalize, so that they
do not bury our lines in every run:

- transformers' notice that `CLIPImageProcessor` falls back to its PIL backend when
  torchvision is absent (the image processor is only the safety checker's; nothing we use),
- diffusers' "modules that should be kept in float32: []" on every `.to(dtype)` (the list is
  empty: there is nothing to keep),
- accelerate's five INFO lines per `save_state`/`load_state` (our own line names the
  checkpoint), through `quieted("accelerate")` around those calls.

The filters match the message text exactly, so any other warning of those loggers still shows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# logger name -> fragments of messages that carry no information for our users.
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: []. ",),
}


class DropMessages(logging.Filter):
    """Drop records whose formatted message contains one of `fragments`."""

    def __init__(self, fragments: tuple[str, ...] | list[str]):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def install_noise_filters() -> None:
    """Attach the KNOWN_NOISE filters (once). A logger filter sees the records logged on that
    very logger, which is where these messages come from; the loggers need not exist yet."""
    for name, fragments in KNOWN_NOISE.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in target.filters):
            target.addFilter(DropMessages(fragments))


@contextmanager
def quieted(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the named loggers to `level` for the duration of a call, then restore them."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < level:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.setLevel(old)


@contextmanager
def dropping(name: str, *fragments: str) -> Iterator[None]:
    """Drop messages containing `fragments` from logger `name` during a call."""
    target = logging.getLogger(name)
    flt = DropMessages(fragments)
    target.addFilter(flt)
    try:
        yield
    finally:
        target.removeFilter(flt)


def process_rank(env: dict[str, str] | None = None) -> int:
    """This process's global rank as launchers announce it (torchrun/accelerate: RANK; MPI
    launchers: PMI_RANK / OMPI_COMM_WORLD_RANK); 0 for a single process."""
    env = os.environ if env is None else env
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = env.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def configure_cli_logging(rank: int | None = None) -> None:
    """What the CLI shows: INFO from the main process, only warnings from the other ranks
    (they would repeat every line once per process)."""
    rank = process_rank() if rank is None else rank
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger().setLevel(level)
    install_noise_filters()
    if rank != 0:  # the model-loading bars, too, would show once per process
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
