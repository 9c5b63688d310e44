"""The loop's small parts: what is due after a step, and who may import whom."""

from __future__ import annotations

import ast
from pathlib import Path

from personalize.training.schedule import Due, Schedule

PACKAGE = Path(__file__).resolve().parents[1] / "personalize"


def test_what_is_due_after_each_step():
    schedule = Schedule(
        max_steps=6,
        log_every=4,
        validate_every=3,
        sample_every=0,
        save_every=2,
        checkpoint_every=5,
        check_guard_every=4,
    )
    assert schedule.at(1) == Due(log=True)  # the first step is always logged
    assert schedule.at(2) == Due(save=True)
    assert schedule.at(3) == Due(validate=True)
    assert schedule.at(4) == Due(log=True, save=True, check_guard=True)
    assert schedule.at(5) == Due(checkpoint=True)
    assert schedule.at(6) == Due(log=True, validate=True, save=True, stop=True)
    assert not schedule.at(2).sync_point  # a file write: no reason to meet the other ranks
    assert all(schedule.at(s).sync_point for s in (1, 3, 4, 5, 6))


def _imports(module: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_validation_and_conditioning_do_not_know_the_trainer():
    for name in ("validation.py", "conditioning.py", "schedule.py", "timer.py", "data.py"):
        imported = _imports(PACKAGE / "training" / name)
        assert "personalize.training.loop" not in imported, name
    # The methods read nothing of the loop or the conditioning either.
    for module in (PACKAGE / "methods").glob("*.py"):
        imported = _imports(module)
        assert not {"personalize.training.loop", "personalize.training.conditioning"} & imported
