"""The operator registry: a projection operator registered from outside the package (this test
module) is chosen by name through ``fgsn apply`` and the settings, with no other file touched, and
writes exactly its formula into the selected slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import BENIGN, HARMFUL, make_trio, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from fgsn_daemon.cli.main import app
from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.engine.io.checkpoint import Checkpoint
from fgsn_daemon.engine.operators import Operator, get_operator, operator_names, register, unregister
from fgsn_daemon.service.settings import Settings

NAME = "test_half_delta"


@pytest.fixture
def plugin():
    """Keep half of the fine-tune delta: W_new = W_aligned + ΔW / 2."""

    @register
    class HalfDelta(Operator):
        name = NAME

        def block(self, state, v, delta, axis, lo, hi):
            return (delta[lo:hi] if axis == 0 else delta[:, lo:hi]) / 2

    yield HalfDelta
    unregister(NAME)


def test_builtins_and_unknown_names() -> None:
    assert {"per_neuron", "projector", "restore", "safe_lora"} <= set(operator_names())
    assert get_operator("restore").copies_aligned
    with pytest.raises(ConfigError, match=r"unknown projection operator 'rotate'"):
        get_operator("rotate")


def test_a_plugged_in_operator_runs_end_to_end_through_fgsn_apply(plugin, tmp_path: Path) -> None:
    trio = make_trio(tmp_path / "trio", "llama")
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    benign = write_jsonl(tmp_path / "benign.jsonl", BENIGN)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "apply",
            *("--base", str(trio["base"]), "--aligned", str(trio["aligned"])),
            *("--finetuned", str(trio["finetuned"]), "--harmful", str(harmful), "--benign", str(benign)),
            *("--device", "cpu", "--preset", "activation", "--operator", NAME, "--json", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["params"]["operator"] == NAME
    written = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    al, ft = Checkpoint(trio["aligned"]), Checkpoint(trio["finetuned"])
    layer, space, index = (record["selected"][0][k] for k in ("layer", "space", "index"))
    name = (
        f"model.layers.{layer}.mlp.up_proj.weight"
        if space == "mlp"
        else f"model.layers.{layer}.self_attn.q_proj.weight"
    )
    expected = (al.read(name).double() + (ft.read(name).double() - al.read(name).double()) / 2).float()
    torch.testing.assert_close(written[name][index], expected[index], rtol=0, atol=1e-7)
    untouched = [
        i
        for i in range(written[name].shape[0])
        if i not in {n["index"] for n in record["selected"] if (n["layer"], n["space"]) == (layer, space)}
    ]
    assert torch.equal(written[name][untouched], ft.read(name)[untouched])
    al.close()
    ft.close()
    assert Settings(state_dir=tmp_path / "s", params={"operator": NAME}).params.operator == NAME
