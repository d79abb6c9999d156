"""`recurra bench layers --quick` runs end to end and writes its table, JSON and chart."""

import json

from recurra.cli import main


def test_bench_layers_quick_writes_table_json_and_png(tmp_path):
    out = tmp_path / "layers"
    assert main(["bench", "layers", "--quick", "--skip-flashrnn", "--out", str(out)]) == 0
    data = json.loads((tmp_path / "layers.json").read_text())
    configs = [row[0] for row in data["rows"]]
    assert any(c.startswith("lstm") for c in configs) and any(c.startswith("gru") for c in configs)
    for row in data["rows"]:
        assert row[3] > 0 and row[6] > 0  # timings were measured
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert "speed-up f+b" in (tmp_path / "layers.md").read_text()
