"""Each domain's LoRA adapter sets (versions in the store) and the adaptation runs that train them.

One file, one concern:

    registry.py    adapter versions of a domain: publish, list, fetch, attach; AdapterRef; lora_config
    spec.py        the run contract: RunRequest, Hyperparameters, RunInfo
    validation.py  what a request is checked against before it is queued; LoRA inheritance; frozen inputs
    records.py     how a run is stored: RunRecord, RunStore (events, inputs, queue markers, checkpoints)
    queue.py       every state transition of a run: submit, claim, requeue, cancel, finish (torch-free)
    lease.py       RunContext: a worker's hold on its run (lease, cancel checks, batched events, checkpoints)
    execution.py   execute(): the phases of one run, base-eval -> train -> index -> eval -> publish -> finish
    promotion.py   decide(record, pointer) -> Decision, then apply it
    training.py    Trainer (retriever phase, then RAG End2End) and its losses, IndexRefresher, checkpoints
    synthetic.py   training data made from a domain's passages: inverse-cloze pairs, generated questions
    evaluation.py  EM, F1 and recall with bootstrap intervals; paired differences; is_better
    qa.py          a domain's QA sets
    supervisor.py  RunManager: the run worker processes and their lifecycle
    cli.py         `ragadapt adapt` and `ragadapt eval`
"""

from adapters.errors import AdapterError, AdapterIncompatible, AdapterVersionNotFound, InvalidAdapterSet
from adapters.registry import AdapterRef, AdapterRegistry

__all__ = [
    "AdapterError",
    "AdapterIncompatible",
    "AdapterRef",
    "AdapterRegistry",
    "AdapterVersionNotFound",
    "InvalidAdapterSet",
]
