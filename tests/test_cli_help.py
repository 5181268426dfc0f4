"""The CLI tells users what it will do: defaults, choices, an example, the names to type."""

from __future__ import annotations

import argparse
import shlex

import pytest

from swr.app.cli import COMMANDS, EXAMPLES, build_parser, main


def _subparsers(advanced: bool = True) -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(advanced=advanced)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_default_and_a_working_example(name, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help-advanced"])  # every option, the advanced ones too
    out = capsys.readouterr().out
    body = out[out.index("\noptions:"):]
    # every optional value (not a flag, not required) says its default
    for action in _subparsers()[name]._actions:
        if (action.option_strings and not action.required and action.nargs != 0
                and action.default is not argparse.SUPPRESS):
            line = body[body.index("\n  " + action.option_strings[-1]) + 1:]
            nxt = line.find("\n  -", 1)
            assert "default" in line[:nxt if nxt > 0 else None], (name, action.option_strings)
        if action.choices and action.option_strings:
            assert "{" + ",".join(action.choices) + "}" in out
    # one example, and it parses
    example = out.split("example:\n", 1)[1].strip().splitlines()[0]
    assert example == EXAMPLES[name]
    argv = shlex.split(example)
    assert argv[:2] == ["swr", name]
    build_parser().parse_args(argv[1:])


def test_the_short_help_shows_what_a_user_chooses(capsys):
    """swr search --help: at most 12 options besides the help flags; research knobs are
    parsed but listed only by --help-advanced."""
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    usage = out[:out.index("\n\n")]
    shown = {w.strip("[]").split()[0] for w in usage.replace("\n", " ").split(" [")[1:]}
    shown |= {w for w in usage.split() if w.startswith("--") and not w.startswith("--help")}
    shown = {w.strip("[]") for w in shown if w.startswith("-")} - {"-h", "--help-advanced"}
    assert len(shown) <= 12, sorted(shown)
    assert "--bn-clips" not in out and "--help-advanced" in out
    args = build_parser().parse_args(["search", "--task", "t", "--checkpoint", "c", "--budget",
                                      "5%", "--out", "o", "--bn-clips", "4"])
    assert args.bn_clips == 4


def test_list_prints_the_registries(capsys):
    from swr.methods import METHODS
    from swr.policies import SEARCHERS
    from swr.tasks import SUITE_FORMS, TASK_FORMS
    from swr.tasks.backbones import BACKBONE_FORMS

    def listed(*argv) -> list[str]:
        assert main(["list", *argv]) == 0
        return [line.split()[0] for line in capsys.readouterr().out.splitlines()]

    assert listed("methods") == sorted(METHODS) and "swr-knapsack" in METHODS
    assert listed("policies") == list(SEARCHERS)
    assert listed("backbones") == BACKBONE_FORMS
    tasks = listed("tasks")
    assert set(TASK_FORMS + SUITE_FORMS) <= set(tasks) and "glyphs:sketch" in tasks
    assert listed("tasks", "mswc*") == ["mswc:<path>:<lang>", "mswc:<root>:<lang1>,<lang2>,..."]
    timm_names = listed("backbones", "timm:resnet1*t")
    assert "timm:resnet10t" in timm_names and all(n.startswith("timm:resnet1") for n in timm_names)
    assert main(["list", "tasks", "nothing-like-this*"]) == 2
    assert "swr list tasks" in capsys.readouterr().err
