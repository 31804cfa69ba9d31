"""Whether a finished run's adapter version goes live: its promotion policy against what serves now."""

from __future__ import annotations

from adapters.records import RunRecord
from storage.errors import PreconditionFailed
from storage.registry import DomainRegistry


def promote(domains: DomainRegistry, record: RunRecord) -> tuple[bool, str]:
    """Apply the run's promotion policy; returns (promoted, why)."""
    from adapters.evaluation import is_better

    if record.promoted:
        return True, "promoted"
    policy = record.promote
    if policy == "never":
        return False, "policy is never"
    pointer = domains.live(record.domain)
    if pointer.adapter_version == record.adapter_version:  # promoted before a crash could record it
        return True, "promoted"
    reason = "promoted"
    if policy == "if_better":
        base, final = record.metrics.get("base"), record.metrics.get("final")
        if final is None:
            return False, "no evaluation to compare"
        better, why = is_better(final, base, record.request.primary_metric)
        if not better:
            return False, f"not significantly better than what serves: {why}"
        reason = f"better than what served: {why}"
        if pointer.adapter_version != record.parent:
            return (
                False,
                f"the live adapter changed during the run ({record.parent} -> {pointer.adapter_version})",
            )
    try:
        domains.promote(
            record.domain,
            record.adapter_version,
            index_version=record.index_version,
            expected_etag=pointer.etag if policy == "if_better" else None,
        )
    except PreconditionFailed:
        return False, "the live pointer changed while promoting; promote by hand if still wanted"
    return True, reason
