"""The README's examples stay true: its spec example builds, its CLI commands exist, CI runs its test command."""
import json
import re

from PTQLogic.app.cli import build_parser
from PTQLogic.models.torch_models import build_network
from PTQLogic.core.spec import spec_from_dict

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_spec_example_builds_its_network():
    block = re.search(r"```json\n(.*?)```", README, re.S).group(1)
    spec = spec_from_dict(json.loads(block))
    assert spec.num_classes == 4
    assert build_network(spec).__class__.__name__ == spec.architecture


def test_cli_examples_parse():
    parser = build_parser()
    commands = re.findall(r"^ptqseg (.+?)(?:\s+#.*)?$", README.replace("\\\n    ", ""), re.M)
    assert len(commands) >= 6
    for command in commands:
        args = [a for a in re.sub(r"\[[^\]]*\]", "", command).split()]
        parser.parse_args(args)  # exits (SystemExit) on an unknown command or option


def test_ci_runs_the_readme_test_command():
    test_command = "python -m pytest Testing -q"
    assert test_command in README
    assert test_command in (ROOT / ".ci" / "run").read_text()
