"""The command line: the main job in one command."""

import json
import subprocess
import sys

import pytest

from fxcanon.cli import main
from fxcanon.report import THRESHOLD, THROUGH_LAYOUT


def test_cli_table_for_a_torchvision_model(capsys):
    assert main(["resnet18", "--size", "64"]) == 0
    out = capsys.readouterr()
    assert "resnet18" in out.out and "err f64" in out.out and "[1/1] resnet18" in out.err


def test_cli_json_and_own_model(capsys):
    assert main(["fxcanon.models:RelationNetwork", "--json", "--fold-only"]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row["batchnorms_before"] == 4 and row["batchnorms_after"] == 0
    assert row["folds"][THROUGH_LAYOUT] == 1 and row["equivalent"]


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "fxcanon", "densenet121", "--size", "32", "--no-check", "--json"],
                          capture_output=True, text=True, check=True)
    row, = json.loads(done.stdout)
    assert row["folds"][THRESHOLD] == 62 and row["batchnorms_after"] == 0


def broken_factory():
    raise RuntimeError("weights missing")


@pytest.mark.parametrize("argv", [
    ["nosuchmodel"],
    ["test_cli:broken_factory"],
    ["nosuchpackage.models:build"],
    ["fxcanon.zoo:ZOO"],
    ["resnet18", "--batch", "0"],
    ["resnet18", "--size", "-3"],
    ["resnet18", "--bogus"],
    [],
    ["explain", "nosuchmodel"],
    ["explain", "resnet18", "--image", "/nonexistent/cat.jpg"],
    ["explain", "resnet18", "--image", __file__],
    ["explain", "resnet18", "--size", "32", "--target", "1000"],
    ["explain", "resnet18", "--out", "/nonexistent/fig.png"],
    ["explain", "resnet18", "--weights", "/nonexistent/weights.pt"],
])
def test_bad_input_is_one_line_and_status_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(("fxcanon: error: ", "fxcanon explain: error: ")) and "Traceback" not in err[-1]
    assert all(line.startswith("[") for line in err[:-1])  # progress lines only
