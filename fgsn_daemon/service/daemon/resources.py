"""The lineage's shared resources: the three models, the localiser, the safety band and the benign
statistics, loaded once and reused by every job."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fgsn_daemon.core.errors import FGSNError, PolicyError, PromptFileError
from fgsn_daemon.core.policy import (
    bundled_benign,
    reference_harmful_prompts,
)
from fgsn_daemon.core.prompts import load_prompts
from fgsn_daemon.core.records import Band
from fgsn_daemon.engine.activations import ActivationStats, resolve_device
from fgsn_daemon.engine.io.checkpoint import folder_fingerprint
from fgsn_daemon.engine.localisation import choose_band
from fgsn_daemon.engine.pipeline import (
    Localiser,
    ModelTrio,
)
from fgsn_daemon.service.daemon.state import (
    DaemonState,
    engine_params,
)
from fgsn_daemon.service.versions import VersionStore


def setting_prompts(setting: str, path: Path) -> list[str]:
    """A prompt file named by a setting; its errors name the setting, as the user wrote it."""
    try:
        return load_prompts(path)
    except PromptFileError as exc:
        raise PromptFileError(f"setting {setting!r}: {exc}") from None


class LineageResources(DaemonState):
    """The lineage's shared resources."""

    def open_models(self) -> ModelTrio:
        s = self.settings
        if s.base is None or s.aligned is None or s.finetuned is None:
            raise FGSNError("the base, aligned and finetuned model paths must all be configured")
        if self.trio is None:
            trio = ModelTrio.open(s.base, s.aligned, s.finetuned)
            reg = self.open_registry()
            fingerprints = (
                folder_fingerprint(s.base),
                folder_fingerprint(s.aligned),
                folder_fingerprint(s.finetuned),
            )
            try:
                self.check_registry_matches_state_folder()  # before anything is written to either
                with reg.transaction() as tx:
                    self.lineage_id = tx.ensure_lineage(*fingerprints)
                self.versions = VersionStore(self.state_dir / f"lineage-{self.lineage_id}")
                self._write_lineage_marker()
                self._point_top_level_link()
            except BaseException:
                trio.close()
                raise
            self.trio = trio
        return self.trio

    def get_localiser(self) -> Localiser:
        if self.localiser is None:
            s = self.settings
            # the prompt files first: a bad path stops the start before the lineage is recorded
            benign = setting_prompts("benign", s.benign) if s.benign is not None else bundled_benign("train")
            calibration = setting_prompts("calibration", s.calibration) if s.calibration is not None else None
            try:  # the contrast's refusal targets: the lineage's reference set (as the band's)
                reference = reference_harmful_prompts(s.band_reference)
            except (PromptFileError, PolicyError) as exc:
                raise type(exc)(f"setting 'band_reference': {exc}") from None
            trio = self.open_models()
            self.localiser = Localiser(
                trio,
                engine_params(s),
                resolve_device(s.device),
                benign,
                progress=self.progress,
                placement=s.placement(),
                dtype=s.torch_dtype(),
                refusal_reference=reference,
                calibration_prompts=calibration,
            )
        return self.localiser

    def ensure_band(self) -> Band:
        """The lineage's layer curve and band, computed once (forward passes) and cached in the DB."""
        if self.band is not None:
            return self.band
        reg = self.open_registry()
        params = engine_params(self.settings)
        key = f"benign+reference:{params.score_model}:{params.max_length}"
        loc = self.get_localiser()
        # the lineage's reference set, read once with the Localiser (it also gives the contrast's
        # targets); a custom set keys its own curve
        prompts = list(loc.refusal_reference or ())
        if self.settings.band_reference is not None:
            key += ":" + hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:16]
        stored = reg.layer_curve(self.lineage_id, key)
        if stored is not None:
            loc.curve, loc.band = stored.curve, choose_band(stored.curve, params.band)
        else:
            loc.establish_band(prompts)
            assert loc.curve is not None and loc.band is not None
            with reg.transaction() as tx:
                tx.save_layer_curve(self.lineage_id, loc.curve, loc.band, key)
        self.band = loc.band
        assert self.band is not None
        return self.band

    def benign_stats(self) -> ActivationStats:
        """Benign statistics in the band: computed once, kept in memory and cached on disk."""
        loc = self.get_localiser()
        band = self.ensure_band()
        params = loc.params
        key = repr((band, params.spaces, params.max_length, params.score_model, list(loc.benign_prompts)))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache = self.state_dir / f"lineage-{self.lineage_id}" / f"benign-stats-{digest}.safetensors"
        if loc.has_benign({(layer, space) for layer in band.layers for space in params.spaces}):
            if not cache.exists():  # computed with the layer curve: keep it for the next start
                loc.benign_stats.save(cache)
        elif cache.exists():
            loc.set_benign(ActivationStats.load(cache))
        else:
            self.progress("benign forward pass (band only; reused for every dimension)")
            loc.set_benign(loc.collect(loc.benign_prompts, band.layers))
            loc.benign_stats.save(cache)
        return loc.benign_stats

    def models_available(self) -> bool:
        s = self.settings
        missing = [str(p) for p in (s.base, s.aligned, s.finetuned) if p is None or not Path(p).exists()]
        if missing:
            self._report_once(
                f"models-missing:{missing}",
                "daemon.model_missing",
                None,
                f"model path(s) missing: {', '.join(missing)}; jobs wait until they are back",
            )
            return False
        return True
