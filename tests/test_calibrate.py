"""`specwan calibrate` writes a measured device profile that runs accept."""

from __future__ import annotations

import yaml

from harness.cli import main
from harness.profiles import role_profile
from systems.api import Op


def test_calibrate_writes_a_measured_profile(tmp_path, capsys):
    out = tmp_path / "measured_toy.yaml"
    assert main(["calibrate", "pair=toy", "name=measured_toy", "--repeats", "3", "--out", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["name"] == "measured_toy"
    for role in ("edge", "cloud"):
        profile = role_profile(doc[role])
        assert profile.kind == "measured" and "specwan calibrate" in profile.source
        assert profile.cost(Op("draft", 1, 100)) > 0
    cloud = role_profile(doc["cloud"])
    assert cloud.cost(Op("verify", 8, 100)) >= cloud.cost(Op("verify", 1, 100))


def test_calibrate_rejects_unknown_options(capsys):
    assert main(["calibrate", "pairs=toy"]) == 2
    assert "unknown option" in capsys.readouterr().err
