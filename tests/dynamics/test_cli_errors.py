"""``qkdissect dynamics``: one CLI framework — bad values give one ``error:`` line (markup shown literally),
exit 2, no traceback; every option's default is its config's default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qkdissect.cli import app as main_app
from qkdissect.commands.dynamics import app
from qkdissect.commands.dynamics.common import config_from_options, list_default
from qkdissect.dynamics.runs.configs import (
    DepthSweepConfig,
    GeneralizationConfig,
    ICLConfig,
    MetalearnConfig,
    SaxeConfig,
    TransferConfig,
)
from qkdissect.errors import QKDissectError

runner = CliRunner()

BAD = [
    (["saxe", "--strengths", "[/x]"], "[/x]"),
    (["saxe", "--strengths", "[bold]abc"], "[bold]abc"),
    (["saxe", "--init", "[red]he"], "[red]he"),
    (["depth-sweep", "--depths", "2,[/x]"], "[/x]"),
    (["depth-sweep", "--init", "orthogonal,[bold]he"], "[bold]he"),
    (["generalization", "--strengths", "3,[i]two"], "3,[i]two"),
    (["transfer", "--alignment", "[/x]"], "[/x]"),
    (["transfer", "--snr-source", "[bold]abc"], "[bold]abc"),
    (["metalearn", "--quick", "--prior", "[bold]diag"], "[bold]diag"),
    (["icl", "--quick", "--attention", "softmax,[/cosine]"], "[/cosine]"),
]


@pytest.mark.parametrize(("args", "value"), BAD)
def test_bad_value_is_one_error_line_with_the_literal_value(tmp_path: Path, args: list[str], value: str) -> None:
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.strip().startswith("error:")]
    assert len(errors) == 1, result.output
    assert value in errors[0], (value, errors[0])


def test_bad_value_through_the_main_command_line(tmp_path: Path) -> None:
    result = runner.invoke(main_app, ["dynamics", "saxe", "--strengths", "[/x]", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        "error: --strengths: expected comma-separated numbers such as 5,4,3, got '[/x]'."]


def test_out_path_with_markup_is_printed_literally(tmp_path: Path) -> None:
    out = tmp_path / "[bold]run"
    result = runner.invoke(app, ["saxe", "--strengths", "2,1", "--a0", "1e-3", "--lr", "0.05", "--seeds", "1",
                                 "--hidden", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "results.json").is_file()
    assert "[bold]run" in result.output.replace("\n", "")


CONFIGS = {"saxe": SaxeConfig, "depth-sweep": DepthSweepConfig, "generalization": GeneralizationConfig,
           "transfer": TransferConfig, "metalearn": MetalearnConfig, "icl": ICLConfig}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_option_defaults_are_the_config_defaults(command: str) -> None:
    cls = CONFIGS[command]
    group = typer.main.get_command(app)
    params = {p.name: p for p in group.commands[command].params}
    default = cls()
    shared = [f.name for f in dataclasses.fields(cls) if f.name in params]
    assert len(shared) >= 10  # the options are the config's fields, not a copy under other names
    for name in shared:
        value = getattr(default, name)
        expected = list_default(value) if isinstance(value, tuple) else value
        assert params[name].default == expected, (command, name)
    # and the options left out are the ones a user has no reason to set
    assert {f.name for f in dataclasses.fields(cls)} - set(params) <= {
        "layers", "learner_a0", "learner_record_every", "probe_scale", "outer_tasks", "sweep_settings"}


def test_config_from_options_parses_lists_and_keeps_other_values() -> None:
    config = config_from_options(DepthSweepConfig, {"depths": "2-4,8", "init": "gaussian, orthogonal",
                                                    "strengths": "3,1.5", "lr": 0.5, "out": "ignored"})
    assert config.depths == (2, 3, 4, 8) and config.init == ("gaussian", "orthogonal")
    assert config.strengths == (3.0, 1.5) and config.lr == 0.5 and config.seeds == DepthSweepConfig().seeds
    with pytest.raises(QKDissectError, match="--init"):
        config_from_options(DepthSweepConfig, {"init": " , "})
