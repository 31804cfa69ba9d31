"""Whether a finished run's adapter version goes live, and making it so.

`decide(record, pointer)` is the run's promotion policy against what serves now, and nothing else: no store,
no clock. `apply` carries a decision out: it moves the domain's live pointer, by compare-and-swap for
`if_better` (a run judged better than what served must not replace something promoted meanwhile).
`promote` is the two together, as a run's last phase calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.records import RunRecord
from storage.errors import PreconditionFailed
from storage.registry import DomainRegistry, LivePointer


@dataclass(frozen=True)
class Decision:
    """`promoted`: the run's version is live, or is to be made live when `move` says the pointer must move
    (only while it still has `expected_etag`, when given). `reason` is what the run's last event says."""

    promoted: bool
    reason: str
    move: bool = False
    expected_etag: str | None = None


def decide(record: RunRecord, pointer: LivePointer | None) -> Decision:
    """The run's policy (`never`, `if_better`, `always`) against the domain's live pointer as read now.

    `pointer` may be None only for a run already promoted or whose policy is `never` (they need no pointer).
    `if_better` promotes when the paired 95% interval of the gain on the run's primary metric lies above
    zero (`adapters.evaluation.is_better`), and only if what was live when the run was submitted still is."""
    from adapters.evaluation import is_better

    if record.promoted:
        return Decision(True, "promoted")
    policy = record.promote
    if policy == "never":
        return Decision(False, "policy is never")
    if pointer is None:
        raise ValueError(f"promotion policy {policy!r} needs the live pointer")
    if pointer.adapter_version == record.adapter_version:  # promoted before a crash could record it
        return Decision(True, "promoted")
    if policy == "always":
        return Decision(True, "promoted", move=True)
    base, final = record.metrics.get("base"), record.metrics.get("final")
    if final is None:
        return Decision(False, "no evaluation to compare")
    better, why = is_better(final, base, record.request.primary_metric)
    if not better:
        return Decision(False, f"not significantly better than what serves: {why}")
    if pointer.adapter_version != record.parent:
        return Decision(
            False, f"the live adapter changed during the run ({record.parent} -> {pointer.adapter_version})"
        )
    return Decision(True, f"better than what served: {why}", move=True, expected_etag=pointer.etag)


def apply(domains: DomainRegistry, record: RunRecord, decision: Decision) -> tuple[bool, str]:
    """Carry `decision` out for the run's version; returns (promoted, why)."""
    if decision.move:
        try:
            domains.promote(
                record.domain,
                record.adapter_version,
                index_version=record.index_version,
                expected_etag=decision.expected_etag,
            )
        except PreconditionFailed:
            return False, "the live pointer changed while promoting; promote by hand if still wanted"
    return decision.promoted, decision.reason


def promote(domains: DomainRegistry, record: RunRecord) -> tuple[bool, str]:
    """Decide on the live pointer as it is now, then apply; returns (promoted, why)."""
    settled = record.promoted or record.promote == "never"
    pointer = None if settled else domains.live(record.domain)
    return apply(domains, record, decide(record, pointer))
