"""Running jobs one at a time: apply (score, select, skip frozen units) and rollback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fgsn_daemon.core.errors import ConfigError, DiskSpaceError, FGSNError
from fgsn_daemon.core.faults import fault_point
from fgsn_daemon.core.policy import (
    Dimension,
)
from fgsn_daemon.core.records import ApplyResult, NeuronId
from fgsn_daemon.engine.continual import assign_claims, neurons_by_unit
from fgsn_daemon.engine.entry_masks import save_masks
from fgsn_daemon.engine.pipeline import (
    Localiser,
    entry_selection,
    unit_tensors,
)
from fgsn_daemon.engine.scorings import get_scoring
from fgsn_daemon.service.daemon.state import (
    LOG,
    WAITING_FOR_SPACE,
    DaemonState,
    StopRequested,
    finish_job,
    load_policy,
    skip_frozen,
)
from fgsn_daemon.service.registry.models import CandidateOutcome, JobKind, JobState, RevisionStatus
from fgsn_daemon.service.registry.views import JobInfo


class JobRunner(DaemonState):
    """Running jobs one at a time."""

    def drain(self) -> int:
        """Run pending jobs one at a time, oldest first. Returns how many finished."""
        reg = self.open_registry()
        done = 0
        while not self.stop_event.is_set():
            pending = [
                j for j in reg.jobs(self.lineage_id, unfinished_only=True) if j.state == JobState.PENDING
            ]
            if not pending:
                break
            job = min(pending, key=lambda j: j.id)
            if not self.models_available():
                break
            try:
                self.run_job(job)
                done += 1
            except StopRequested:
                LOG.info("stopping: job %s will resume at the next start", job.id)
                break
        return done

    def run_job(self, job: JobInfo) -> None:
        """Run one job. An FGSNError fails it with the error recorded (never retried on every
        tick); a lack of disk space also records what it needed, for ``retry_after_space``."""
        reg = self.open_registry()
        try:
            if job.kind == JobKind.APPLY:
                self.run_apply(job.id)
            else:
                self.run_rollback(job.id)
        except FGSNError as exc:
            state = reg.job(job.id).state
            if state in (JobState.DONE, JobState.FAILED, JobState.DISCARDED):
                return
            space = isinstance(exc, DiskSpaceError)
            message = str(exc) + ("; the job is retried once enough space is free" if space else "")
            self._fail_job(job.id, state, job.revision_id if job.kind == JobKind.APPLY else None, message)
            if isinstance(exc, DiskSpaceError):
                with reg.transaction() as tx:
                    tx.append_event(
                        WAITING_FOR_SPACE,
                        lineage_id=self.lineage_id,
                        dimension_name=job.dimension,
                        revision_id=job.revision_id,
                        job_id=job.id,
                        details={"needed": exc.needed, "free": exc.free},
                    )
        finally:
            self._job_masks.clear()  # scoring and publishing shared them; the next job reads afresh

    def _fail_job(self, job_id: int, state: JobState, revision_id: int | None, error: str) -> None:
        LOG.error("job %s failed: %s", job_id, error)
        with self.open_registry().transaction() as tx:
            tx.transition_job(job_id, state, JobState.FAILED, error=error)
            if revision_id is not None:
                tx.set_revision_status(revision_id, RevisionStatus.FAILED, error=error)

    def applied_order(self) -> list[int]:
        """Applied revisions in the order they were applied (by the job that applied them)."""
        reg = self.open_registry()
        applied = {r.id for r in reg.revisions(self.lineage_id, status=RevisionStatus.APPLIED)}
        jobs = [j for j in reg.jobs(self.lineage_id) if j.kind == JobKind.APPLY and j.state == JobState.DONE]
        order = [j.revision_id for j in sorted(jobs, key=lambda j: j.id) if j.revision_id in applied]
        return list(dict.fromkeys(r for r in order if r is not None))

    def stored_candidates(self, revision_id: int) -> list[NeuronId]:
        return [
            c.neuron
            for c in self.open_registry().revision_candidates(revision_id)
            if c.outcome in (CandidateOutcome.SELECTED, CandidateOutcome.SKIPPED)
        ]

    def run_apply(self, job_id: int) -> None:
        reg = self.open_registry()
        with reg.transaction() as tx:
            if not tx.transition_job(job_id, JobState.PENDING, JobState.SCORING):
                return
        fault_point("job_scoring_started")
        job = reg.job(job_id)
        assert job.revision_id is not None
        rev = reg.revision(job.revision_id)
        try:
            dim = load_policy(self.settings.policy_dir / rev.dimension)
        except (FGSNError, OSError) as exc:
            self._fail_job(job_id, JobState.SCORING, rev.id, f"cannot read dimension {rev.dimension}: {exc}")
            return
        if dim.fingerprint != rev.content_fingerprint:
            with reg.transaction() as tx:
                tx.transition_job(
                    job_id,
                    JobState.SCORING,
                    JobState.DISCARDED,
                    error="the dimension changed before it was applied; a new revision follows",
                )
            return
        try:
            result = self.localise(dim, rev.id)
        except FGSNError as exc:
            self._fail_job(job_id, JobState.SCORING, rev.id, str(exc))
            return
        fault_point("after_scoring")
        self.check_stop()
        with reg.transaction() as tx:
            tx.record_revision_result(rev.id, result)
            tx.transition_job(job_id, JobState.SCORING, JobState.EDITING)
        fault_point("job_result_recorded")
        # a changed dimension replaces its applied revision in the same version
        replaced = [
            r.id
            for r in reg.revisions(self.lineage_id, status=RevisionStatus.APPLIED)
            if r.dimension == rev.dimension
        ]
        order = [r for r in self.applied_order() if r not in replaced] + [rev.id]
        candidates = {r: self.stored_candidates(r) for r in order if r != rev.id}
        candidates[rev.id] = [c.id for c in result.candidates]
        self.check_stop()

        def finish(tx: Any, version_id: int) -> None:
            for old in replaced:
                tx.set_revision_status(old, RevisionStatus.SUPERSEDED)
            tx.set_revision_status(rev.id, RevisionStatus.APPLIED)
            finish_job(tx, job_id)
            tx.append_event(
                "dimension.applied",
                lineage_id=self.lineage_id,
                dimension_name=rev.dimension,
                revision_id=rev.id,
                job_id=job_id,
                details={
                    "selected": len(result.selected),
                    "skipped": len(result.skipped),
                    "replaced": replaced,
                    "modified_ratio": result.modification.ratio,
                },
            )

        self._publish(order, candidates, job_id=job_id, finish=finish, released=replaced)
        LOG.info(
            "applied %s: %d neurons selected, %d skipped",
            rev.dimension,
            len(result.selected),
            len(result.skipped),
        )

    def localise(self, dim: Dimension, revision_id: int) -> ApplyResult:
        """This dimension's candidates and selection (frozen = neurons owned by other dimensions)."""
        loc = self.get_localiser()
        params = loc.params
        fgsn: Any = dim.spec.fgsn  # generated from the declaration (core.params.overrides_model)
        q = fgsn.q if fgsn and fgsn.q is not None else params.q
        p = fgsn.p if fgsn and fgsn.p is not None else params.p
        harmful = list(dim.harmful)
        if fgsn and fgsn.max_prompts:
            harmful = harmful[: fgsn.max_prompts]
        self.ensure_band()
        scoring = fgsn.scoring if fgsn and fgsn.scoring else params.scoring
        positions = fgsn.positions if fgsn and fgsn.positions else params.positions
        budget = fgsn.budget if fgsn and fgsn.budget is not None else params.budget
        contrast = fgsn.contrast if fgsn and fgsn.contrast is not None else params.contrast
        loc.params = replace(params, scoring=scoring, positions=positions, budget=budget, contrast=contrast)
        self.progress(f"{dim.name}: scoring {len(harmful)} harmful prompts ({scoring})")
        try:
            if params.unit == "entry" and loc.params.unit != "entry":
                # an activation scoring selects whole neurons per band layer: it cannot fill this
                # lineage's entry claims (and would be recorded as what did not run)
                raise ConfigError(
                    f"{dim.name}: [fgsn] scoring {scoring!r} scores whole neurons; this daemon "
                    "selects entry units, which only attribution scores (drop the override, or run "
                    'the daemon with unit = "neuron")'
                )
            # the dimension's own benign prompts, when given, replace the shared set for it
            benign_stats = None
            if not dim.benign and get_scoring(scoring).uses_activation_stats:
                benign_stats = self.benign_stats()
            reg = self.open_registry()
            frozen = {
                n: owner for n, owner in reg.frozen_neurons(self.lineage_id).items() if owner != dim.name
            }
            masks_digest, entries = None, None
            if params.unit == "entry":
                masks = loc.localise_entries(harmful, list(dim.benign) if dim.benign else None)
                selection = skip_frozen(entry_selection(loc, masks), frozen)
                masks_digest = save_masks(
                    self.masks_dir,
                    masks,
                    unit_tensors(self.open_models(), range(self.open_models().num_layers), params.spaces),
                )
                entries = sum(int(m.sum()) for m in masks.values())
            else:
                scores = loc.score_prompts(
                    harmful,
                    scoring_name=scoring,
                    positions=positions,
                    benign=benign_stats,
                    benign_prompts=list(dim.benign) if dim.benign else None,
                )
                selection = loc.select(scores, q, p, frozen)
            # recorded under this dimension's own settings (a per-dimension scoring or contrast)
            benign_set, contrast_set, calibration_set = loc.prompt_sets(
                list(dim.benign) if dim.benign else None
            )
        finally:
            loc.params = params
        self._warn_truncated(dim.name, revision_id, harmful, loc)
        trio = self.open_models()
        from fgsn_daemon.engine.pipeline import count_entry_modification, count_modification

        assert loc.band is not None  # established above (ensure_band)

        if masks_digest is not None:
            # this revision's own entries: its candidates that no other applied dimension restores
            others = [r for r in self.applied_order() if reg.revision(r).dimension != dim.name]
            taken = self.claimed_entry_masks({r: [] for r in others})
            mine = {n: m & ~taken[n] if n in taken else m for n, m in masks.items()}
            modification = count_entry_modification(trio, mine, loc.band, params.spaces)
        else:
            modification = count_modification(
                trio,
                neurons_by_unit({0: [n.id for n in selection.selected]}),
                loc.band,
                params.spaces,  # type: ignore[arg-type]
            )
        rec = params.record().model_copy(
            update={
                "q": q,
                "p": p,
                "scoring": scoring,
                "positions": positions,
                "budget": budget,
                "contrast": contrast,
            }
        )
        assert loc.curve is not None and loc.band is not None
        return ApplyResult(
            params=rec,
            curve=loc.curve,
            band=loc.band,
            layer_counts=selection.counts,
            candidates=selection.candidates,
            selected=selection.selected,
            skipped=selection.skipped,
            modification=modification,
            output=None,
            edited_tensors=[],
            entry_masks=masks_digest,
            entries=entries,
            benign=benign_set,
            contrast=contrast_set,
            calibration=calibration_set,
        )

    def _warn_truncated(self, name: str, revision_id: int, prompts: Sequence[str], loc: Localiser) -> None:
        """Prompts longer than ``max_length`` tokens are scored on their first ``max_length``
        tokens: said once per revision, in the log and the history, rather than failing."""
        if loc.tokenizer is None:
            return
        limit = loc.params.max_length
        lengths = [len(ids) for ids in loc.tokenizer(list(prompts))["input_ids"]]
        cut = sum(n > limit for n in lengths)
        if not cut:
            return
        message = f"{name}: {cut} prompt(s) longer than {limit} tokens (up to {max(lengths)}) were truncated"
        LOG.warning(message)
        with self.open_registry().transaction() as tx:
            tx.append_event(
                "dimension.prompts_truncated",
                lineage_id=self.lineage_id,
                dimension_name=name,
                revision_id=revision_id,
                details={"prompts": cut, "max_length": limit, "longest": max(lengths), "message": message},
            )

    def plan_rollback(
        self, dimension: str
    ) -> tuple[int, list[int], dict[int, list[NeuronId]], dict[int, list[NeuronId]]]:
        """(revision rolled back, remaining order, claims before, claims after) — no side effects."""
        reg = self.open_registry()
        applied = [
            r
            for r in reg.revisions(self.lineage_id, status=RevisionStatus.APPLIED)
            if r.dimension == dimension
        ]
        if not applied:
            raise FGSNError(f"dimension {dimension!r} has no applied revision to roll back")
        target = applied[-1].id
        order = self.applied_order()
        candidates = {r: self.stored_candidates(r) for r in order}
        before = assign_claims(order, candidates)
        remaining = [r for r in order if r != target]
        after = assign_claims(remaining, candidates)
        return target, remaining, before, after

    def run_rollback(self, job_id: int) -> None:
        reg = self.open_registry()
        with reg.transaction() as tx:  # no scoring phase: candidates come from the registry
            if not (
                tx.transition_job(job_id, JobState.PENDING, JobState.SCORING)
                and tx.transition_job(job_id, JobState.SCORING, JobState.EDITING)
            ):
                return
        fault_point("rollback_started")
        job = reg.job(job_id)
        name = (job.details or {}).get("dimension") or job.dimension
        try:
            target, remaining, _, _ = self.plan_rollback(str(name))
        except FGSNError as exc:
            self._fail_job(job_id, JobState.EDITING, None, str(exc))
            return
        candidates = {r: self.stored_candidates(r) for r in remaining}

        def finish(tx: Any, version_id: int) -> None:
            tx.set_revision_status(target, RevisionStatus.ROLLED_BACK)
            finish_job(tx, job_id)
            tx.append_event(
                "dimension.rolled_back",
                lineage_id=self.lineage_id,
                dimension_name=str(name),
                revision_id=target,
                job_id=job_id,
            )

        self._publish(remaining, candidates, job_id=job_id, finish=finish, released=[target])
        LOG.info("rolled back %s", name)
