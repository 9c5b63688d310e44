"""One error base: every exception class of the package derives from PersonalizeError, the
package raises no bare builtin exception for a user-facing condition, and the CLI turns any
PersonalizeError into one line and its exit code."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil

import pytest
from helpers import ROOT

import personalize
from personalize import cli, errors
from personalize.errors import PersonalizeError

# Raising these builtins is right: an abstract method, and the fault injection that stands in
# for a real disk error (it must look like one to the code under test).
ALLOWED_BUILTIN_RAISES = {
    ("personalize/methods/base.py", "NotImplementedError"),
    ("personalize/training/faults.py", "OSError"),
}
# How a `main()` hands its exit code to the shell, and what Python's protocols expect of
# `__getitem__` (end of a sequence) and `__getattr__` (no such attribute).
ALLOWED_EVERYWHERE = {"SystemExit", "IndexError", "AttributeError"}


def _all_modules():
    for info in pkgutil.walk_packages(personalize.__path__, "personalize."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def _exception_classes() -> list[type[BaseException]]:
    found = {}
    for module in _all_modules():
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("personalize"):
                found[obj.__qualname__] = obj
    return sorted(found.values(), key=lambda c: c.__qualname__)


def test_every_exception_class_derives_from_personalize_error():
    classes = _exception_classes()
    assert len(classes) >= 15, [c.__name__ for c in classes]  # the walk found them
    assert [c for c in classes if not issubclass(c, PersonalizeError)] == []
    # ... and all live in the leaf errors.py; older modules only re-export them.
    assert {c.__module__ for c in classes} == {"personalize.errors"}


def test_the_package_raises_no_bare_builtin_exception():
    builtin_errors = {
        name
        for name, obj in vars(builtins).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException)
    }
    bare = []
    for path in sorted((ROOT / "personalize").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", None)
                if (
                    name in builtin_errors
                    and name not in ALLOWED_EVERYWHERE
                    and (rel, name) not in ALLOWED_BUILTIN_RAISES
                ):
                    bare.append(f"{rel}:{node.lineno} raise {name}")
    assert bare == [], bare


def _instances():
    for cls in _exception_classes():
        if cls is errors.TrainingInterrupted:
            yield cls("stopped by SIGTERM at step 3", 15), "interrupted", 128 + 15
        else:
            yield cls("what went wrong; how to fix it"), "error", cls.exit_code


@pytest.mark.parametrize("exc,prefix,code", list(_instances()), ids=lambda v: type(v).__name__)
def test_cli_prints_any_personalize_error_as_one_line(exc, prefix, code, monkeypatch, capsys):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_cmd_train", fail)
    assert cli.main(["train", "config.yaml"]) == code
    err = capsys.readouterr().err
    assert err == f"{prefix}: {exc}\n"  # one line, no traceback


def test_exit_codes_keep_their_meaning():
    assert errors.ConfigError.exit_code == 2  # bad input
    assert errors.CheckpointNotFoundError.exit_code == 2  # resume= names nothing
    assert errors.TrainingError.exit_code == 1  # the run could not go on
    assert errors.CheckpointError.exit_code == 1
    # Callers that caught the builtin before keep working.
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.OutputExistsError, FileExistsError)
    assert issubclass(errors.TrainingError, RuntimeError)
