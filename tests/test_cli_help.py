"""`napari-stego --help`: every option explained once, defaults shown once, examples, demo."""

import argparse

import pytest

from napari_stego import DEFAULT_N_CLUSTERS, __version__
from napari_stego.cli import build_parser, main

COMMANDS = ["fit", "segment", "evaluate", "suggest-k", "demo", "weights"]


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_points_to_demo_and_has_examples(capsys):
    text = _help([], capsys)
    assert "New here? `napari-stego demo`" in text
    assert "examples:\n  napari-stego demo\n" in text
    for name in COMMANDS:
        assert f"    {name}" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"napari-stego {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_argument_has_help_and_one_default(command, capsys):
    sub = _subparsers(build_parser())[command]
    for action in sub._actions:
        assert action.help, (command, action.dest)
    text = _help([command], capsys)
    assert "(default: None)" not in text and "(default: False)" not in text
    formatter = sub._get_formatter()
    for action in sub._actions:
        shown = formatter._expand_help(action)
        assert shown.count("default") <= 1, shown
    assert "examples:\n  napari-stego " + command in text


@pytest.mark.parametrize("command", ["fit", "segment"])
def test_required_out_is_shown_as_required(command, capsys):
    text = " ".join(_help([command], capsys).split())
    assert "(required)" in text or "; required)" in text
    sub = _subparsers(build_parser())[command]
    out = next(a for a in sub._actions if "--out" in a.option_strings)
    assert out.required and "default" not in sub.formatter_class("x")._get_help_string(out)


def test_one_default_k_for_fit_and_demo():
    subs = _subparsers(build_parser())
    for command in ("fit", "demo"):
        assert subs[command].get_default("n_clusters") == DEFAULT_N_CLUSTERS
    assert "(default: 0)" in " ".join(subs["fit"].format_help().split())  # --seed
