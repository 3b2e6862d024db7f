"""Library messages name settings, the command line shows them as flags and decides exit codes.

Outside ``reir/cli/`` a message names a setting as `` `name` `` (the keyword a Python caller passes); only
``reir.cli.messages`` knows that a setting is a flag, and which exit code an error type gives.
"""

from __future__ import annotations

import ast
import inspect
import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import run_reir
from reir import errors
from reir.cli import common, messages

PACKAGE = Path(__file__).resolve().parents[1] / "reir"
# A flag in a string: two dashes opening a word, or opening a formatted value (``--{key}``).
FLAG = re.compile(r"(?<![\w-])--(?:[A-Za-z][\w-]*|\{\})")
# A command shown in a docstring as typed: a code span that starts with the program's name.
EXAMPLE_COMMAND = re.compile(r"``(?:reir|torchrun|python|pip) [^`]*``")
# Flags of other programs that a library message tells the user to pass to them, each with its reason.
OTHER_PROGRAMS = {
    "--force-reinstall": "pip's option, in the command that restores matplotlib's fonts",
    "--nproc_per_node": "torchrun's option, which starts the processes a distributed run needs",
}


def library_strings() -> list[tuple[str, int, str, bool]]:
    """Each string of the library outside ``reir/cli/``, as (file, line, text, whether it is a docstring); an
    f-string's formatted values read ``{}``, and a docstring is read without its example commands
    (``reir ...``, ``torchrun ...``), which are shown as typed."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if relative.parts[1] == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and ast.get_docstring(node, clean=False) is not None}
        parts = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                parts.update(id(part) for part in node.values)
                text = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
                found.append((str(relative), node.lineno, text, False))
        found += [(str(relative), node.lineno,
                   EXAMPLE_COMMAND.sub("", node.value) if id(node) in docstrings else node.value,
                   id(node) in docstrings)
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts]
    return found


def test_the_scan_sees_plain_and_formatted_flags():
    assert EXAMPLE_COMMAND.sub("", "Run ``reir x --flag`` with ``--weights``.") == "Run  with ``--weights``."
    tree = ast.parse('def f(key):\n    return f"pass --{key} 1", "or --weights"\n')
    texts = ["".join(p.value if isinstance(p, ast.Constant) else "{}" for p in n.values)
             for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)]
    assert FLAG.findall(texts[0]) == ["--{}"] and FLAG.findall("or --weights") == ["--weights"]
    assert not FLAG.findall("a -- b, x--y, 2026--12")


def test_library_code_names_no_flag():
    strings = library_strings()
    assert len(strings) > 500, "the scan found too few strings to be reading the library"
    flags = [(file, line, flag) for file, line, text, _ in strings for flag in FLAG.findall(text)]
    named = [f"{file}:{line}: {flag}" for file, line, flag in flags if flag not in OTHER_PROGRAMS]
    assert not named, "library messages name a setting as `name`, not its flag:\n" + "\n".join(named)
    assert {flag for _, _, flag in flags} == set(OTHER_PROGRAMS), "an allowed flag no message names any more"


def test_every_setting_a_message_names_is_a_flag_of_some_command():
    marked = {(file, line, name) for file, line, text, docstring in library_strings() if not docstring
              for name in messages.SETTING_MARK.findall(text)}
    assert len(marked) > 40
    every = messages.every_command_flag()
    unknown = sorted(f"{file}:{line}: `{name}`" for file, line, name in marked if name not in every)
    assert not unknown, "these marks name no flag of any command:\n" + "\n".join(unknown)


def test_the_running_commands_own_flag_comes_first_and_other_text_stays():
    messages.forget_flags()
    try:
        assert messages.as_flags("prepare with `skip_bad`") == "prepare with --skip_bad"  # another command's flag
        assert messages.as_flags("`export_format` 'x'") == "--format 'x'"  # a flag named otherwise than its setting
        assert messages.as_flags("`images` x, `chosen_thing` y") == "--images x, `chosen_thing` y"
        parser = common.ArgumentParser(prog="demo")
        parser.add_argument("--images_from", dest="images")
        parser.add_argument("--pick", dest="chosen_thing")
        parser.parse_args(["--pick", "1"])
        assert messages.as_flags("`images` x, `chosen_thing` y") == "--images_from x, --pick y"
        assert messages.as_flags("no mark, `not a name`, `no_such_setting`") == (
            "no mark, `not a name`, `no_such_setting`")
    finally:
        messages.forget_flags()


def test_a_setting_reads_as_the_setting_in_python_and_as_the_flag_on_the_command_line(tmp_path):
    from reir.devices import parse_device
    from reir.retrieval.database import Database

    with pytest.raises(errors.UsageError) as raised:
        parse_device("tpu")
    assert str(raised.value) == "`device` 'tpu' is not a device; use cpu, cuda or cuda:N"
    path = tmp_path / "x_data_base.safetensors"
    features = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    Database({"test": features}, {"test": {"paths": [f"{i}.png" for i in range(6)], "labels": ["a", "b"] * 3}},
             {"recalls": [1]}, {"data_name": "digits"}).save(path)
    refused = run_reir("eval", "--data_base", path, "--device", "tpu")
    assert refused.returncode == 2
    assert refused.stderr == "error: --device 'tpu' is not a device; use cpu, cuda or cuda:N\n"


def test_every_error_type_has_an_exit_code_and_a_subclass_is_decided_before_its_base():
    kinds = list(messages.EXIT_CODES)
    declared = [kind for _, kind in inspect.getmembers(errors, inspect.isclass) if issubclass(kind, Exception)]
    assert set(declared) <= set(kinds)
    for position, kind in enumerate(kinds):
        assert not any(issubclass(later, kind) for later in kinds[position + 1:] if later is not kind), kind
    assert messages.exit_code(errors.ReirError("x")) == 1
    assert messages.exit_code(errors.UsageError("x")) == 2
    assert messages.exit_code(errors.StoppedBySignal("x", signal.SIGTERM)) == 128 + signal.SIGTERM
    assert messages.exit_code(KeyboardInterrupt()) == 128 + signal.SIGINT == 130
    assert not hasattr(errors.ReirError("x"), "exit_code")
