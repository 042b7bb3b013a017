"""Settings: precedence CLI > FGSN_* environment > TOML > defaults, masking, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fgsn_daemon.cli.registry import parse_param_flags, register
from fgsn_daemon.core import defaults
from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.engine.pipeline import FGSNParams as EngineParams
from fgsn_daemon.service.settings import (
    effective_config,
    load_settings,
    mask_database_url,
    render_config_toml,
)

PASSWORD = "s3cr3t-pw"
TOML = f"""
device = "cpu"
state_dir = "/srv/fgsn-state"
database_url = "postgresql+psycopg://fgsn:{PASSWORD}@db.internal:5432/fgsn"
scan_interval_s = 30

[params]
q = 3
p = 2
scoring = "contrast"
operator = "projector"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FGSN_* variable or ./fgsn.toml from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("FGSN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "fgsn.toml"
    path.parent.mkdir()
    path.write_text(TOML)
    return path


def test_defaults_put_the_sqlite_registry_in_the_state_dir(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.state_dir == tmp_path / "state"
    assert settings.database_url_value() == f"sqlite:///{tmp_path / 'state' / 'registry.db'}"
    # with no configuration, the daemon uses exactly the engine's defaults
    engine = EngineParams()
    assert (settings.params.scoring, settings.params.operator) == (engine.scoring, engine.operator)
    assert (settings.params.q, settings.params.p) == (engine.q, engine.p)
    assert tuple(settings.params.spaces) == engine.spaces
    assert settings.device == "auto"


def test_precedence_cli_over_env_over_toml(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml_only = load_settings(config_file)
    assert (toml_only.device, toml_only.params.q, toml_only.params.scoring) == ("cpu", 3.0, "contrast")
    assert toml_only.scan_interval_s == 30

    monkeypatch.setenv("FGSN_DEVICE", "cuda")
    monkeypatch.setenv("FGSN_PARAMS__Q", "4")
    monkeypatch.setenv("FGSN_PARAMS__SPACES", "attn")
    with_env = load_settings(config_file)
    assert (with_env.device, with_env.params.q, with_env.params.spaces) == ("cuda", 4.0, ["attn"])
    assert with_env.params.scoring == "contrast"  # nested values merge: TOML still supplies the rest

    with_cli = load_settings(config_file, {"device": "cpu", "params": {"q": 1.5, "p": None}, "base": None})
    assert (with_cli.device, with_cli.params.q) == ("cpu", 1.5)
    assert with_cli.params.p == 2.0  # a flag left at None does not hide the TOML value
    assert with_cli.params.spaces == ["attn"]
    assert with_cli.params.operator == "projector"
    assert with_cli.base is None


def test_config_file_from_env_default_file_and_missing_file(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FGSN_CONFIG", str(config_file))
    assert load_settings().params.operator == "projector"
    other = tmp_path / "other.toml"
    other.write_text('[params]\noperator = "safe_lora"\n')
    assert load_settings(other).params.operator == "safe_lora"  # --config beats FGSN_CONFIG
    monkeypatch.delenv("FGSN_CONFIG")
    assert load_settings().params.operator == defaults.OPERATOR
    (tmp_path / "fgsn.toml").write_text('[params]\noperator = "per_neuron"\n')
    assert load_settings().params.operator == "per_neuron"  # ./fgsn.toml when present
    with pytest.raises(ConfigError, match=r"nope\.toml \(from --config\) does not exist"):
        load_settings(tmp_path / "nope.toml")
    monkeypatch.setenv("FGSN_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml \(from FGSN_CONFIG\) does not exist"):
        load_settings()


def test_secrets_are_masked(config_file: Path) -> None:
    settings = load_settings(config_file)
    assert PASSWORD in settings.database_url_value()
    assert PASSWORD not in repr(settings)
    shown = effective_config(settings)
    assert shown["database_url"] == "postgresql+psycopg://fgsn:***@db.internal:5432/fgsn"
    assert PASSWORD not in render_config_toml(settings)
    assert mask_database_url("sqlite:////srv/x/registry.db") == "sqlite:////srv/x/registry.db"
    assert mask_database_url("not a url at all ::") == "***"


def test_config_show_command_masks_and_applies_flags(config_file: Path) -> None:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Commands under test."""

    register(app)
    runner = CliRunner()
    text = runner.invoke(app, ["config", "show", "--config", str(config_file), "--param", "band=[10,15]"])
    assert text.exit_code == 0, text.output
    assert PASSWORD not in text.output
    assert 'database_url = "postgresql+psycopg://fgsn:***@db.internal:5432/fgsn"' in text.output
    assert "band = [10, 15]" in text.output
    as_json = runner.invoke(
        app,
        ["config", "show", "--json", "--config", str(config_file), "--device", "cuda:1", "--param", "q=7"],
    )
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert (data["device"], data["params"]["q"], data["params"]["p"]) == ("cuda:1", 7.0, 2.0)
    assert PASSWORD not in as_json.output
    bad = runner.invoke(app, ["config", "show", "--param", "operator=rotate"])
    assert bad.exit_code == 2
    assert "params.operator" in bad.output and "'restore'" in bad.output


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"params": {"operator": "rotate"}}, r"params\.operator: .*unknown projection operator .rotate."),
        ({"params": {"q": 0}}, r"params\.q: Input should be greater than 0 \(got 0\)"),
        ({"params": {"q": 150}}, r"params\.q: Input should be less than or equal to 100 \(got 150\)"),
        ({"params": {"p": -1}}, r"params\.p: Input should be greater than or equal to 0"),
        ({"params": {"band": (15, 10)}}, r"params\.band: Value error, band must be \[start, end\]"),
        ({"params": {"spaces": ["mlp", "conv"]}}, r"params\.spaces\.1: Input should be 'mlp' or 'attn'"),
        ({"device": "tpu"}, r"device: String should match pattern"),
        ({"scan_interval_s": 0}, r"scan_interval_s: Input should be greater than 0"),
    ],
)
def test_validation_errors_name_the_field(overrides: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        load_settings(None, overrides)
    assert "invalid configuration" in str(caught.value)


def test_bad_values_from_toml_and_env_are_reported_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('colour = "blue"\n[params]\nq = 101\n')
    monkeypatch.setenv("FGSN_PARAMS__OPERATOR", "rotate")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert "3 problem(s)" in message
    assert "colour: Extra inputs are not permitted" in message
    assert "params.q: Input should be less than or equal to 100" in message
    assert "params.operator" in message
    assert str(path) in message


def test_malformed_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[params\nq = 3\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(path)


def test_bad_database_url_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"database_url": "::nonsense:pw"})
    assert "database_url: Value error, not a database URL" in str(caught.value)
    assert "nonsense" not in str(caught.value)


def test_param_flags_parse() -> None:
    assert parse_param_flags(["q=3", "spaces=mlp,attn", "band=[1, 2]", "band=null"]) == {
        "q": "3",
        "spaces": "mlp,attn",
        "band": None,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_param_flags(["q"])


def test_band_reference_defaults_to_the_shipped_policies_and_accepts_a_file_or_a_folder(
    tmp_path: Path,
) -> None:
    from fgsn_daemon.core.errors import PolicyError
    from fgsn_daemon.core.policy import REFERENCE_PER_DIMENSION, reference_harmful_prompts

    shipped = reference_harmful_prompts()
    assert len(shipped) >= 6 * min(REFERENCE_PER_DIMENSION, 10)
    prompts = tmp_path / "reference.jsonl"
    prompts.write_text('{"prompt": "hack wifi"}\n{"prompt": "make bomb"}\n')
    assert reference_harmful_prompts(prompts) == ["hack wifi", "make bomb"]
    folder = tmp_path / "refs"
    (folder / "cyber").mkdir(parents=True)
    (folder / "cyber" / "policy.toml").write_text('description = "d"\nsource = "s"\nlicense = "MIT"\n')
    (folder / "cyber" / "harmful.jsonl").write_text('{"prompt": "hack wifi"}\n')
    assert reference_harmful_prompts(folder) == ["hack wifi"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError):
        reference_harmful_prompts(tmp_path / "empty")
    cfg = tmp_path / "fgsn.toml"
    cfg.write_text(f'band_reference = "{prompts}"\n')
    assert load_settings(cfg).band_reference == prompts


def test_engine_params_carry_every_configured_field() -> None:
    """Every field of the parameters' declaration reaches the engine, none left at its default."""
    from fgsn_daemon.core.params import FGSNFields
    from fgsn_daemon.service.daemon import engine_params

    changed = {
        "q": 7.0,
        "p": 3.0,
        "scoring": "contrast",
        "positions": "last",
        "operator": "projector",
        "spaces": ["attn"],
        "score_model": "finetuned",
        "band": [1, 2],
        "rank": 3,
        "batch_size": 5,
        "max_length": 99,
        "allocation": "per_layer",
        "budget": 1.5,
        "scope": "band",
        "unit": "neuron",
        "target_tokens": 9,
        "guard": 4.0,
        "steps": 3,
        "hard_rounds": 0,
        "hard_weight": 0.5,
        "hard_positive_weight": 0.25,
        "hard_at": "edited",
        "hard_target": 2.5,
        "path_steps": 3,
        "calibration_max": 17,
        "contrast_kind": "odds",
        "contrast": 0.75,
    }
    assert set(changed) == set(FGSNFields.model_fields)
    engine = engine_params(load_settings(None, {"params": changed}))
    for name, value in changed.items():
        want = tuple(value) if isinstance(value, list) else value
        assert getattr(engine, name) == want, name


def test_engine_and_record_declare_the_same_parameters_with_the_same_defaults() -> None:
    """The engine's dataclass mirrors the one declaration (same names, same defaults), and the
    revision record keeps every field that changes the selection, taken from the engine's values."""
    import dataclasses

    from fgsn_daemon.core.params import FGSNFields
    from fgsn_daemon.core.records import ApplyParams
    from fgsn_daemon.engine.pipeline import FGSNParams

    engine_fields = {f.name: f for f in dataclasses.fields(FGSNParams)}
    engine_defaults = FGSNParams()
    for name, info in FGSNFields.model_fields.items():
        assert name in engine_fields, f"the engine does not know {name}"
        declared = info.get_default(call_default_factory=True)
        engine_value = getattr(engine_defaults, name)
        if name == "spaces":
            engine_value = list(engine_value)
        assert engine_value == declared, f"{name}: engine default {engine_value!r} != {declared!r}"
    run_only = {"batch_size"}  # how fast it runs, not what it selects
    recorded = set(ApplyParams.model_fields) - {"band_override"}
    assert recorded == set(engine_fields) - run_only - {"band"}  # engine-only fields included
    changed = FGSNParams(
        budget=0.25, contrast=0.6, target_tokens=9, path_steps=2, band=(1, 2), spaces=("attn",), max_length=64
    )
    record = changed.record()
    assert (record.budget, record.contrast, record.target_tokens, record.path_steps) == (0.25, 0.6, 9, 2)
    assert record.max_length == 64
    assert record.band_override == (1, 2) and record.spaces == ["attn"]


def test_the_integrated_preset_fills_the_path_integrated_setting_and_flags_still_win() -> None:
    from fgsn_daemon.service.daemon import engine_params

    engine = engine_params(load_settings(None, {"params": {"preset": "integrated"}}))
    assert (engine.path_steps, engine.contrast, engine.hard_rounds, engine.unit) == (3, 0.78, 0, "entry")
    engine.validate()
    override = engine_params(load_settings(None, {"params": {"preset": "integrated", "path_steps": 5}}))
    assert override.path_steps == 5 and override.contrast == 0.78
    default = engine_params(load_settings(None, {}))
    assert default.path_steps == 1  # the default preset stays first order
    assert default.hard_target == 1.0  # the default calibrates its hard weight
    fixed = engine_params(load_settings(None, {"params": {"hard_target": "off"}}))  # TOML has no null
    assert fixed.hard_target is None and fixed.hard_weight == 0.05


def test_the_daemon_hands_its_calibration_prompts_to_the_engine(tmp_path: Path) -> None:
    """``calibration`` (JSONL): the benign prompts the hard rounds look for refusals in; unset, the
    engine falls back to the shared benign prompts (``calibration_prompts`` is None)."""
    from helpers import make_trio, write_jsonl

    from fgsn_daemon.service.daemon import Daemon
    from fgsn_daemon.service.settings import load_settings

    trio = make_trio(tmp_path / "trio", "llama")
    prompts = ["Describe a calm lake.", "How do I fold a paper boat?"]
    calibration = write_jsonl(tmp_path / "calibration.jsonl", prompts)
    for given, expected in ((calibration, prompts), (None, None)):
        state = tmp_path / f"state-{given is None}"
        overrides = {k: trio[k] for k in ("base", "aligned", "finetuned")}
        overrides |= {"policy_dir": tmp_path / "policies", "state_dir": state, "calibration": given}
        daemon = Daemon(load_settings(None, overrides))
        try:
            assert daemon.get_localiser().calibration_prompts == expected
        finally:
            daemon.close()
