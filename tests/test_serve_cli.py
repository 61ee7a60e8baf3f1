"""``fastprompt serve`` at the command line, where vLLM may be absent: listed in the help, and without vLLM a
one-line error saying what is missing (exit code 2), never a traceback; a bad ``--adapter`` is refused by format."""

from __future__ import annotations

import importlib.util

import pytest

from fastprompt.cli import main

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

pytestmark = pytest.mark.vllm  # runs in both environments: the vLLM one selects it by this marker


def test_serve_is_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message given where vLLM is not installed")
def test_serve_without_vllm_says_what_is_missing(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "some/model", "--adapter", "a=b"])
    assert exit_info.value.code == 2
    assert "serve needs vLLM, which is not installed here" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_VLLM, reason="--adapter is parsed by the serve options, which need vLLM installed")
def test_serve_refuses_an_adapter_without_a_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "some/model", "--adapter", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
