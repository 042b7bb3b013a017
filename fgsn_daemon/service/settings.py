"""Daemon configuration: CLI flags > ``FGSN_*`` environment > TOML file > defaults.

The TOML file is ``--config PATH`` (passed to :func:`load_settings`), else ``$FGSN_CONFIG``, else
``./fgsn.toml`` when it exists. Nested FGSN parameters live in the ``[params]`` table, or in
``FGSN_PARAMS__<NAME>`` environment variables. Everything funnels through :func:`load_settings`,
which turns pydantic's validation errors into one :class:`~fgsn_daemon.core.errors.ConfigError` whose
message names every bad field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from fgsn_daemon.core import defaults
from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.params import FGSNFields
from fgsn_daemon.engine.activations import Placement

CONFIG_ENV_VAR = "FGSN_CONFIG"
DEFAULT_CONFIG_FILE = Path("fgsn.toml")
REGISTRY_FILE_NAME = "registry.db"
MASK = "***"


# The TOML path chosen by load_settings; a ContextVar because pydantic-settings builds its sources
# inside a classmethod and offers no per-call argument for the TOML path.
_toml_path: ContextVar[Path | None] = ContextVar("fgsn_toml_path", default=None)


class FGSNParams(FGSNFields):
    """The daemon's FGSN parameters: the fields of ``core.params.FGSNFields``, a preset that fills
    the ones not given, and method names checked against the engine's registries."""

    # a named setting (fgsn_daemon.core.defaults.PRESETS) whose values fill every field not given explicitly
    preset: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        explicit = dict(data)
        if data.get("preset") is not None:
            try:
                values = defaults.preset(str(data["preset"]))
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            data = {**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, **data}
        # entry units are restored; another operator given without a unit means neuron units
        if explicit.get("operator") not in (None, "restore") and "unit" not in explicit:
            data = {**data, "unit": "neuron"}
        return data

    @field_validator("scoring", "operator")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        from fgsn_daemon.engine.operators import get_operator
        from fgsn_daemon.engine.scorings import get_scoring

        try:
            (get_scoring if info.field_name == "scoring" else get_operator)(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


class Settings(BaseSettings):
    """Effective daemon configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="FGSN_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    base: Path | None = None
    aligned: Path | None = None
    finetuned: Path | None = None
    policy_dir: Path = Path("policies")
    state_dir: Path = Path("state")
    # Shared benign prompts (JSONL) for neuron scoring; None = the bundled synthetic set.
    benign: Path | None = None
    # Benign prompts (JSONL) the over-refusal hard rounds look for refusals in; None = `benign`.
    calibration: Path | None = None
    # Harmful prompts the safety band is computed from (a JSONL file, or a policy folder whose
    # dimensions each give their first prompts); None = the policies shipped with the package.
    band_reference: Path | None = None
    # None means "SQLite file in state_dir"; read the resolved value from database_url_value().
    database_url: SecretStr | None = None
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+)$")] = "auto"
    # Models larger than one device: accelerate's device_map for the scoring models ("none" = all on
    # `device`); max_memory per device (e.g. {"0" = "70GiB", "cpu" = "100GiB"}); weights that do not
    # fit go to offload_dir (default: state_dir/offload). Offloaded weights cannot be edited in
    # memory, so a LoRA fine-tune, the guard and iterative steps need them resident.
    device_map: Literal["none", "auto", "balanced", "balanced_low_0", "sequential"] = "none"
    # the scoring models' compute dtype: bfloat16 halves GPU memory (edits are still computed in
    # float64 and written in the checkpoint's own dtype)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_memory: dict[str, str] | None = None
    offload_dir: Path | None = None
    params: FGSNParams = Field(default_factory=FGSNParams)
    scan_interval_s: float = Field(default=10.0, gt=0)
    settle_s: float = Field(default=5.0, ge=0, description="a policy folder must be unchanged this long")

    @field_validator(
        "base",
        "aligned",
        "finetuned",
        "policy_dir",
        "state_dir",
        "benign",
        "calibration",
        "band_reference",
        "offload_dir",
    )
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Absolute paths, so the CLI run from another directory finds the same state.
        return None if value is None else value.expanduser().absolute()

    @field_validator("database_url")
    @classmethod
    def _parseable_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                make_url(value.get_secret_value())
            except Exception as exc:  # sqlalchemy raises ArgumentError, plain ValueError, ...
                raise ValueError(f"not a database URL ({exc.__class__.__name__})") from None
        return value

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if self.database_url is None:
            self.database_url = SecretStr(f"sqlite:///{self.state_dir / REGISTRY_FILE_NAME}")
        return self

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.compute_dtype)

    def placement(self) -> Placement | None:
        """The device map the scoring models are loaded with; None = one device."""
        if self.device_map == "none":
            return None
        memory: dict[str | int, str] | None = None
        if self.max_memory is not None:
            memory = {int(k) if k.isdigit() else k: v for k, v in self.max_memory.items()}
        return Placement(self.device_map, memory, self.offload_dir or self.state_dir / "offload")

    def database_url_value(self) -> str:
        """The database URL in clear, for connecting (never print it)."""
        assert self.database_url is not None  # filled in by _default_database
        return self.database_url.get_secret_value()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier wins: init (CLI flags) > environment > TOML. No .env or secrets directory.
        toml_path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


def resolve_config_path(config: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The TOML file to read: explicit path, else ``$FGSN_CONFIG``, else ``./fgsn.toml`` if present."""
    env = os.environ if environ is None else environ
    if config is not None:
        chosen, origin = config, "--config"
    elif env.get(CONFIG_ENV_VAR):
        chosen, origin = Path(env[CONFIG_ENV_VAR]), CONFIG_ENV_VAR
    else:
        return DEFAULT_CONFIG_FILE.absolute() if DEFAULT_CONFIG_FILE.is_file() else None
    chosen = chosen.expanduser()
    if not chosen.is_file():
        raise ConfigError(f"configuration file {chosen} (from {origin}) does not exist")
    return chosen.absolute()


def load_settings(config: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the effective settings.

    ``overrides`` are the CLI flags: keys are field names, ``params`` may be a partial mapping;
    ``None`` values mean "flag not given" and are dropped so lower layers still apply.
    """
    path = resolve_config_path(config)
    flags = _drop_none(dict(overrides or {}))
    token = _toml_path.set(path)
    try:
        return Settings(**flags)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, path)) from None
    except ValueError as exc:  # malformed TOML or an undecodable environment value
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where}: {exc}") from None
    finally:
        _toml_path.reset(token)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            nested = _drop_none(dict(value))
            if nested:
                cleaned[key] = nested
        elif value is not None:
            cleaned[key] = value
    return cleaned


def _describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    lines = [f"invalid configuration ({len(exc.errors())} problem(s)):"]
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(settings)"
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        if field.startswith("database_url"):
            shown = ""  # never echo a DSN that may hold a password
        lines.append(f"  {field}: {error['msg']}{shown}")
    sources = "CLI flags, FGSN_* environment variables" + (f", {path}" if path is not None else "")
    lines.append(f"  (settings come from: {sources})")
    return "\n".join(lines)


def mask_database_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (unparseable URLs are masked whole)."""
    try:
        parsed = make_url(url)
    except Exception:
        return MASK
    return parsed.render_as_string(hide_password=True)  # SQLAlchemy writes the password as "***"


def effective_config(settings: Settings) -> dict[str, Any]:
    """The configuration as plain JSON-able data, with secrets masked (for ``fgsn config show``)."""
    data = settings.model_dump(mode="json", exclude={"database_url"})
    data["database_url"] = mask_database_url(settings.database_url_value())
    ordered = {name: data[name] for name in Settings.model_fields}
    return ordered


def render_config_toml(settings: Settings) -> str:
    """TOML text of :func:`effective_config` (``null`` values shown as comments)."""
    data = effective_config(settings)
    top = [_toml_line(key, value) for key, value in data.items() if not isinstance(value, dict)]
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            tables.extend(_toml_line(name, item) for name, item in value.items())
    return "\n".join(top + tables) + "\n"


def _toml_line(key: str, value: object) -> str:
    if value is None:
        return f"# {key} is not set"
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON string escaping is valid TOML basic-string escaping.
    return json.dumps(str(value))
