"""The CLI prints user errors as one line, and lets bugs (e.g. a KeyError) keep their traceback."""

import argparse

import pytest

from lmfusion import cli


def _parser_running(function):
    parser = argparse.ArgumentParser()
    parser.set_defaults(func=function, command="x")
    return parser


@pytest.mark.parametrize("error, user", [(ValueError("bad value"), True), (FileNotFoundError("no file"), True),
                                         (KeyError("internal"), False)])
def test_only_user_errors_become_one_line(monkeypatch, capsys, error, user):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_running(fail))
    if user:
        assert cli.main([]) == 2
        assert capsys.readouterr().err.strip() == f"lmfusion x: error: {error}"
    else:
        with pytest.raises(KeyError):
            cli.main([])


def test_every_flag_of_every_command_has_help_text():
    """`lmfusion <command> --help` explains every flag (the guide: help text on every flag)."""
    import argparse

    from lmfusion.cli import build_parser

    missing = []

    def walk(parser, command):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{command} {name}")
            elif action.option_strings and not action.help:
                missing.append(f"{command}: {action.option_strings[0]}")

    walk(build_parser(), "lmfusion")
    assert not missing, missing
