"""README.md's "Using it" commands parse with the real command line, so the README cannot drift from it.

Only parsing (and, for `train`/`audit`, loading the config with the overrides) happens here: the
commands themselves run end to end in the other tests.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from dpcap.cli import COMMANDS, parse_args
from dpcap.config import load_config

REPO = Path(__file__).resolve().parents[1]
PREFIX = ".venv/bin/dpcap"


def using_it_commands() -> list[str]:
    """The `.venv/bin/dpcap …` lines of the first bash block under "## Using it"."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Using it\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section, 'README.md has no "## Using it" section'
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), flags=re.M | re.S)
    assert block, 'no ```bash block under "## Using it"'
    return [line.strip() for line in block.group(1).splitlines() if line.strip().startswith(PREFIX)]


COMMAND_LINES = using_it_commands()


def argv_of(line: str) -> list[str]:
    return shlex.split(line, comments=True)[1:]  # drop .venv/bin/dpcap; `# …` is the README's comment


def test_the_dpcap_script_is_the_cli() -> None:
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    assert scripts and re.search(r'^dpcap = "dpcap\.cli:main"$', scripts.group(1), re.M)


def test_the_block_shows_the_commands_it_is_meant_to() -> None:
    shown = {argv_of(line)[0] for line in COMMAND_LINES}
    assert shown == set(COMMANDS) - {"demo"}  # `make demo` has its own section


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_readme_command_parses(line: str, capsys) -> None:
    argv = argv_of(line)
    try:
        args = parse_args(argv)
        with_json = parse_args([*argv, "--json"])  # "Every command takes `--json`"
    except SystemExit as exit_info:
        pytest.fail(f"README command does not parse (exit {exit_info.code}): {line}\n{capsys.readouterr().err}")
    assert with_json.json is True and args.json is False
    if args.command == "train" and args.config and "=" in args.config:  # as dpcap.cli reads `train KEY=VALUE …`
        args.config, args.overrides = None, [args.config, *args.overrides]
    if args.command in ("train", "audit") and args.config:
        # The overrides name real config keys with values of the right type.
        config = load_config(REPO / args.config, args.overrides)
        for override in args.overrides:
            key, _, value = override.partition("=")
            node = config
            for part in key.split("."):
                node = getattr(node, part)
            assert node == yaml.safe_load(value), override
