"""The command line's parser (ssd.cli): help for every command and option, no torch before a command runs,
the parser's choices equal to the rules they stand for, and each command's handler module in place."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from ssd import cli


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser by its name (``data check``)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subcommands(sub, f"{prefix}{name} ")
                found.update(nested or {f"{prefix}{name}": sub})
    return found


COMMANDS = subcommands(cli.build_parser())


def test_every_command_has_a_handler_and_the_choices_match_their_rules():
    assert sorted(COMMANDS) == [
        "bench", "bn-report", "convert", "data check", "data fit-priors", "data shapes", "demo", "eval", "export",
        "predict", "train", "weights list",
    ]  # fmt: skip
    for name, parser in COMMANDS.items():
        module = importlib.import_module(f"ssd.commands.{parser.get_default('module')}")
        assert callable(module.run), name
    from ssd.checkpoint import WEIGHTS_KINDS
    from ssd.engine.bn_report import DEFAULT_BATCHES

    assert cli.WEIGHTS_KINDS == WEIGHTS_KINDS and cli.BN_REPORT_BATCHES == DEFAULT_BATCHES


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"bench"}))  # bench's options are its own parser's
def test_help_has_a_description_and_every_option_its_help(name):
    parser = COMMANDS[name]
    assert parser.description and parser.description[0].isupper() and parser.description.endswith(".")
    text = " ".join(parser.format_help().split())  # unwrapped
    for action in parser._actions:
        assert action.help, f"ssd {name} {action.option_strings or action.dest}: no help text"
        stated = action.default is not None and not isinstance(action.default, bool)
        if action.option_strings and stated and action.default != argparse.SUPPRESS:
            assert f"default: {action.default})" in text or "default" in action.help, (name, action.dest)


def test_help_and_argument_errors_answer_without_torch():
    code = (
        "import sys\nfrom ssd import cli\n"
        "for argv in (['--help'], ['train', '--help'], ['data', 'check', '--help'], ['train']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'cv2', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "the following arguments are required: config" in out.stderr


def test_bench_help_reaches_the_bench_parser(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ssd bench") and "--repeats" in text and "voc_eval" in text
