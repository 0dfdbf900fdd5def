"""The command line: the main job in one command."""

import json
import subprocess
import sys

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
