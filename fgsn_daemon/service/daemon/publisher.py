"""Publishing a version: claims from the whole applied order, the edited checkpoint, one registry
transaction, then the current link."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.core.faults import fault_point
from fgsn_daemon.core.records import NeuronId
from fgsn_daemon.engine.activations import resolve_device
from fgsn_daemon.engine.continual import assign_claims, neurons_by_unit
from fgsn_daemon.engine.entry_masks import StoredMaskUnion
from fgsn_daemon.engine.io.checkpoint import DEFAULT_MAX_SHARD_BYTES
from fgsn_daemon.engine.pipeline import (
    CheckpointEdit,
)
from fgsn_daemon.service.daemon.state import (
    DaemonState,
    engine_params,
)
from fgsn_daemon.service.registry.models import CandidateOutcome
from fgsn_daemon.service.registry.views import VersionInfo
from fgsn_daemon.service.versions import VersionRepairError


class Publisher(DaemonState):
    """Publishing a version."""

    def current_claims(self, current: VersionInfo) -> dict[int, list[NeuronId]]:
        """The claims the current version was built from (the same rule ``_publish`` applies)."""
        reg = self.open_registry()
        order = self.applied_order()
        label = {f"{r.dimension}#{r.number}": r.id for r in reg.revisions(self.lineage_id)}
        if {label.get(x) for x in current.revisions} != set(order):
            raise VersionRepairError(
                f"the registry's applied revisions {order} are not those of version {current.number} "
                f"({', '.join(current.revisions) or 'none'})"
            )
        return assign_claims(order, {r: self.stored_candidates(r) for r in order})

    def version_inputs(self, claims: dict[int, list[NeuronId]]) -> CheckpointEdit:
        """What a version is computed from: the trio, ``claims``, the band and the edit settings."""
        params = engine_params(self.settings)
        return CheckpointEdit(
            trio=self.open_models(),
            neurons=neurons_by_unit(claims),
            operator=params.operator,
            band=self.ensure_band(),
            spaces=params.spaces,
            rank=params.rank,
            device=resolve_device(self.settings.device),
            max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
            entry_masks=self.claimed_entry_masks(claims) if params.unit == "entry" else None,
        )

    def _publish(
        self,
        order: Sequence[int],
        candidates: dict[int, list[NeuronId]],
        job_id: int | None,
        finish: Callable[[Any, int], None] | None,
        released: Sequence[int] = (),
    ) -> str:
        """Write the version for ``order``, commit claims + version + job outcome, swap ``current``."""
        reg, store = self.open_registry(), self.versions
        assert store is not None
        claims = assign_claims(order, candidates)
        current = reg.current_version(self.lineage_id)
        name = store.next_name()
        self.progress(f"writing version {name} ({sum(len(v) for v in claims.values())} frozen neurons)")
        inputs = self.version_inputs(claims)
        fault_point("before_build")
        store.build_version(name, inputs, parent=Path(current.path).name if current else None)
        fault_point("after_build")
        self.check_stop()
        with reg.transaction() as tx:
            self._sync_claims(tx, claims, candidates, released)
            version_id = tx.add_version(
                self.lineage_id,
                str(store.path(name)),
                list(order),
                parent_id=current.id if current else None,
                make_current=True,
            )
            if finish is not None:
                finish(tx, version_id)
            fault_point("claims_synced_uncommitted")
        fault_point("after_commit")
        store.publish(name)
        fault_point("after_publish")
        return name

    def claimed_entry_masks(self, claims: dict[int, list[NeuronId]]) -> dict[str, Any]:
        """Entry units are owned one by one: an entry belongs to the first applied revision whose
        candidate mask holds it, so the version restores the union of the applied revisions'
        masks. A later dimension never changes an entry an earlier one restored (restoring is a copy
        of the aligned value) and still restores its own new entries inside neurons first claimed by
        an earlier dimension; a rollback drops the revision's mask from the union, which equals a
        run without it."""
        reg = self.open_registry()
        digests = []
        for rev in claims:
            info = reg.revision(rev)
            digest = (info.summary or {}).get("entry_masks")
            if not digest:
                raise FGSNError(
                    f"{info.dimension} (revision {rev}) was applied with neuron units; entry units need an "
                    "entry mask for every applied revision: roll it back and re-apply it, or use unit=neuron"
                )
            digests.append(digest)
        key = "\0".join(digests)
        if key not in self._job_masks:  # content-addressed: the union of these digests never changes
            self._job_masks[key] = StoredMaskUnion(self.masks_dir, digests)
        return self._job_masks[key]

    def _sync_claims(
        self,
        tx: Any,
        claims: dict[int, list[NeuronId]],
        candidates: dict[int, list[NeuronId]],
        released: Sequence[int],
    ) -> None:
        """Make the registry's active claims equal ``claims``, touching only revisions that change."""
        held: dict[int, set[NeuronId]] = {}
        for c in tx.neurons(self.lineage_id):
            held.setdefault(c.revision_id, set()).add(NeuronId(c.layer, c.space, c.index))
        changed = [r for r in claims if set(claims[r]) != held.get(r, set())]
        for rev in {*released, *changed}:  # release first: a neuron may move between revisions
            if held.get(rev):
                tx.release_claims(rev)
        owner_name = {r: tx.revision(r).dimension for r in claims}
        owner_of = {n: r for r, ns in claims.items() for n in ns}
        for rev in changed:
            tx.claim_neurons(rev, claims[rev])
            tx.set_candidate_outcomes(rev, claims[rev], CandidateOutcome.SELECTED)
            mine = set(claims[rev])
            by_owner: dict[str, list[NeuronId]] = {}
            for n in candidates[rev]:
                if n not in mine and n in owner_of:
                    by_owner.setdefault(owner_name[owner_of[n]], []).append(n)
            for name, neurons in by_owner.items():
                tx.set_candidate_outcomes(rev, neurons, CandidateOutcome.SKIPPED, skipped_owner=name)
