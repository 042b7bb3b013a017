"""The settings sweep on a tiny random trio: every setting edits only its band and spaces, the
budget grows with q, random neurons match each setting's counts, and bad settings fail early."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_experiments import one_thread, write_inputs  # noqa: F401  (one_thread: autouse fixture)

from fgsn_daemon.core.records import Band
from fgsn_daemon.lab.experiments import HarnessConfig, TrioSpec
from fgsn_daemon.lab.sweep import Setting, main, resolve_band, run_sweep, sweep_markdown

SETTINGS = [
    Setting("contrast", 10.0, "auto", ("mlp",), "restore"),
    Setting("contrast", 50.0, "auto", ("mlp",), "restore"),
    Setting("contrast", 50.0, "all", ("mlp", "attn"), "safe_lora"),
]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrioSpec, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sweep")
    spec = write_inputs(root)
    cfg = HarnessConfig(max_prompts=3, max_new_tokens=2, device="cpu", work_dir=root)
    return spec, run_sweep(spec, cfg, SETTINGS, random_seeds=[0], command="test")


def fgsn_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["rows"] if r["group"] == "fgsn"]


def test_each_setting_is_a_row_with_its_own_random_control(result: tuple[TrioSpec, dict[str, Any]]) -> None:
    _, res = result
    by_name = {r["name"]: r for r in res["rows"]}
    assert {"aligned", "finetuned"} <= set(by_name)
    rows = fgsn_rows(res)
    assert [r["name"] for r in rows] == [s.name for s in SETTINGS]
    for row in rows:
        rnd = by_name[row["details"]["random_row"]]
        assert rnd["details"]["neurons_per_unit"] == row["details"]["neurons_per_unit"]
        assert 0.0 <= row["metrics"]["mean_asr"] <= 1.0
    small, large, wide = rows
    assert 0 < small["modified_share"] < large["modified_share"] < wide["modified_share"]
    assert "| fgsn/contrast/restore/q10/mlp/band-auto |" in sweep_markdown(res)


def test_edits_stay_inside_each_settings_band_and_spaces(result: tuple[TrioSpec, dict[str, Any]]) -> None:
    _, res = result
    auto = Band(**res["auto_band"])
    for row in fgsn_rows(res):
        setting = row["details"]["setting"]
        layers = set(auto.layers) if setting["band"] == "auto" else set(range(4))
        units = row["details"]["neurons_per_unit"]
        assert units
        for unit in units:
            layer, space = unit.split(":")
            assert int(layer) in layers and space in setting["spaces"]
        for name in row["details"]["changed_tensors"]:
            layer = int(name.split(".")[2])
            assert layer in layers
            module = "self_attn" if ("q_proj" in name or "o_proj" in name) else "mlp"
            assert ("attn" in setting["spaces"]) or module == "mlp", name
    assert any("attn" in u for u in fgsn_rows(res)[2]["details"]["neurons_per_unit"])


def test_band_parsing_and_bad_settings(tmp_path: Path) -> None:
    auto = Band(start=1, end=2, source="auto")
    assert resolve_band("auto", auto, 4) == auto
    assert resolve_band("all", auto, 4).layers == [0, 1, 2, 3]
    assert resolve_band("0:1", auto, 4).layers == [0, 1]
    with pytest.raises(Exception, match="outside"):
        resolve_band("2:9", auto, 4)
    out = tmp_path / "out"
    assert main(["--trio-root", str(tmp_path), "--out", str(out), "--operators", "nope"]) == 2
    assert main(["--trio-root", str(tmp_path), "--out", str(out), "--bands", "x:y"]) == 2
    assert not out.exists()  # nothing written when the settings are refused
