"""The scoring registry: built-ins, clear errors, and a scoring registered from outside the package
(here, this test module) chosen through every entry point — ``fgsn apply``, the daemon's settings
and a policy's ``[fgsn]`` override — with no other file touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import BENIGN, HARMFUL, make_trio, write_jsonl
from typer.testing import CliRunner

from fgsn_daemon.cli.main import app
from fgsn_daemon.core.errors import ConfigError, PolicyError
from fgsn_daemon.engine.activations import NeuronStats
from fgsn_daemon.engine.scorings import (
    NeuronScores,
    Scoring,
    get_scoring,
    register,
    scoring_names,
    unregister,
)
from fgsn_daemon.service.daemon import load_policy
from fgsn_daemon.service.settings import Settings

NAME = "test_last_token_rms"


@pytest.fixture
def plugin():
    """A trivial activation scoring: harmful = RMS over last tokens, benign = benign RMS."""

    @register
    class LastTokenRms(Scoring):
        name = NAME
        summary = "test plug-in"

        def score(self, harmful, benign, out_weight_col_l1, positions):
            return NeuronScores(harmful.rms("last"), benign.rms("all"))

    yield LastTokenRms
    unregister(NAME)


def stats(values: torch.Tensor) -> NeuronStats:
    """Statistics of one prompt whose tokens have activations ``values`` [T, N]."""
    s = NeuronStats.zeros(values.shape[1])
    s.add(values.unsqueeze(0), torch.ones(1, values.shape[0]), torch.tensor([values.shape[0] - 1]))
    return s


def test_builtins_are_registered_and_unknown_names_list_the_choices() -> None:
    assert {"attribution", "contrast", "wanda"} <= set(scoring_names())
    assert not get_scoring("attribution").uses_activation_stats
    assert scoring_names(lambda s: s.uses_activation_stats) == ["contrast", "wanda"]
    with pytest.raises(ConfigError, match=r"unknown scoring 'magic' .*'attribution', 'contrast', 'wanda'"):
        get_scoring("magic")
    with pytest.raises(ConfigError, match="computed from gradients"):
        get_scoring("attribution").score(
            stats(torch.ones(2, 3)), stats(torch.ones(2, 3)), torch.ones(3), "all"
        )


def test_builtin_activation_scorings_match_their_formulas_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    harmful_acts = torch.randn(5, 4, generator=g, dtype=torch.float64)
    benign_acts = torch.randn(7, 4, generator=g, dtype=torch.float64)
    col_l1 = torch.rand(4, generator=g, dtype=torch.float64)
    h, b = stats(harmful_acts), stats(benign_acts)
    wanda = get_scoring("wanda").score(h, b, col_l1, "all")
    torch.testing.assert_close(wanda.harmful, col_l1 * harmful_acts.pow(2).mean(0).sqrt())
    torch.testing.assert_close(wanda.benign, col_l1 * benign_acts.pow(2).mean(0).sqrt())
    contrast = get_scoring("contrast").score(h, b, col_l1, "last")
    torch.testing.assert_close(contrast.harmful, (harmful_acts[-1] - benign_acts[-1]).abs())
    torch.testing.assert_close(contrast.benign, benign_acts[-1].abs())


def test_register_refuses_bad_and_duplicate_names(plugin) -> None:
    class Bad(Scoring):
        name = "Not A Name"

    with pytest.raises(ConfigError, match="lower-case identifier"):
        register(Bad)

    class Clash(Scoring):
        name = NAME

    with pytest.raises(ConfigError, match="already registered"):
        register(Clash)


def test_a_plugged_in_scoring_runs_end_to_end_through_fgsn_apply(plugin, tmp_path: Path) -> None:
    trio = make_trio(tmp_path / "trio", "llama")
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    benign = write_jsonl(tmp_path / "benign.jsonl", BENIGN)
    args = [
        "apply",
        *("--base", str(trio["base"]), "--aligned", str(trio["aligned"])),
        *("--finetuned", str(trio["finetuned"]), "--harmful", str(harmful), "--benign", str(benign)),
        *("--device", "cpu", "--preset", "activation", "--json"),
    ]
    runner = CliRunner()
    mine = runner.invoke(app, [*args, "--scoring", NAME, "--out", str(tmp_path / "mine")])
    assert mine.exit_code == 0, mine.output
    record = json.loads(mine.stdout)
    assert record["params"]["scoring"] == NAME and record["selected"]
    assert (tmp_path / "mine" / "model.safetensors.index.json").exists() or any(
        (tmp_path / "mine").glob("*.safetensors")
    )
    # its ranking, not the default's: the same run with the built-in contrast picks other neurons
    other = runner.invoke(app, [*args, "--scoring", "contrast", "--out", str(tmp_path / "other")])
    assert other.exit_code == 0, other.output
    pick = [
        {(n["layer"], n["space"], n["index"]) for n in json.loads(r.stdout)["selected"]}
        for r in (mine, other)
    ]
    assert pick[0] != pick[1]


def test_settings_and_policy_overrides_take_their_choices_from_the_registry(plugin, tmp_path: Path) -> None:
    assert (
        Settings(state_dir=tmp_path, params={"preset": "activation", "scoring": NAME}).params.scoring == NAME
    )
    with pytest.raises(ValueError, match="unknown scoring 'magic'"):
        Settings(state_dir=tmp_path, params={"scoring": "magic"})
    for name, ok in ((NAME, True), ("magic", False)):
        folder = tmp_path / "policies" / f"dim_{str(ok).lower()}"
        folder.mkdir(parents=True)
        (folder / "policy.toml").write_text(
            f'description = "d"\nsource = "s"\nlicense = "MIT"\n[fgsn]\nscoring = "{name}"\n'
        )
        (folder / "harmful.jsonl").write_text('{"prompt": "hack a bank"}\n')
        if ok:
            assert load_policy(folder).spec.fgsn.scoring == NAME
        else:
            with pytest.raises(PolicyError, match=r"key 'fgsn\.scoring': unknown scoring 'magic'"):
                load_policy(folder)
