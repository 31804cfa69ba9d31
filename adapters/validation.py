"""Everything a run request is checked against before it is queued, and the inputs frozen with it.

`prepare` resolves a `RunRequest` against the store: the domain and its live versions, the LoRA settings
the run starts from (inherited from the live adapter version), the training and evaluation examples (read
and validated now, frozen beside the record so the run trains on what was submitted), and the number of
steps of each phase. A request that cannot run fails here, with nothing stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapters.errors import InvalidQaSet, InvalidRun
from adapters.qa import QaExample, QaSets, example_from_record, parse_qa_jsonl, to_jsonl
from adapters.records import RunRecord, now
from adapters.registry import lora_config
from adapters.spec import DEFAULT_STEPS, QaSource, RunRequest, RunState
from backbone import AdapterSetConfig
from storage.errors import DomainNotFound, InvalidDomainName, InvalidKey, ObjectNotFound
from storage.registry import ArtifactKind, DomainRegistry
from storage.store import ObjectStore


@dataclass(frozen=True)
class Prepared:
    """A validated request: the record to queue and the inputs to freeze beside it."""

    record: RunRecord
    inputs: dict[str, bytes]


def prepare(
    store: ObjectStore, request: RunRequest, run_id: str, *, cuda_available: bool | None = None
) -> Prepared:
    """Check a request against the store and resolve its data; raises DomainNotFound or InvalidRun.

    `cuda_available` answers whether a 4-bit generator can be had (None: ask torch in this process)."""
    domains = DomainRegistry(store)
    hp = request.hyperparameters
    try:
        domains.get_domain(request.domain)
    except InvalidDomainName as exc:  # an invalid name cannot name a domain either
        raise DomainNotFound(f"domain {request.domain!r} does not exist") from exc
    pointer = domains.live(request.domain)
    if pointer.index_version is None:
        raise InvalidRun(f"domain {request.domain!r} has no index yet; wait for its ingestion to finish")
    if request.mode == "generator_only" and hp.index_refresh_every is not None:
        raise InvalidRun(
            "generator_only keeps the passage encoder frozen: there is nothing to re-index "
            "(drop index_refresh_every)"
        )
    if request.mode == "generator_only" and hp.max_index_staleness is not None:
        raise InvalidRun("generator_only never re-indexes: drop max_index_staleness")
    if request.promote == "if_better" and request.evaluation is None:
        raise InvalidRun("promote=if_better compares evaluations: give an evaluation set or another policy")
    if request.evaluation is not None and (not request.evaluation.real or request.evaluation.synthetic):
        raise InvalidRun("evaluation takes real examples only: give a split, uri or examples, no synthetic")
    if request.mode == "generator_only" and hp.retriever_steps:
        raise InvalidRun("generator_only keeps the retriever frozen: it has no retriever phase")
    if hp.quantize_generator == "4bit":
        _check_qlora(cuda_available)

    index_manifest = domains.read_manifest(request.domain, ArtifactKind.INDEXES, pointer.index_version)
    passage_count = int(index_manifest.metadata.get("passage_count") or 0)
    if passage_count and hp.top_k > passage_count:
        raise InvalidRun(f"top_k={hp.top_k} but domain {request.domain!r} has only {passage_count} passages")

    parent = pointer.adapter_version
    lora = hp.lora
    if parent is not None and hp.init == "live":
        inherited = lora_config(domains.read_manifest(request.domain, ArtifactKind.ADAPTERS, parent))
        if lora is not None and inherited is not None and lora != inherited:
            raise InvalidRun(
                f"the run starts from live adapter {parent}, whose LoRA settings differ from the "
                "requested ones; drop hyperparameters.lora or set init='base'"
            )
        lora = inherited or lora
    lora = lora or AdapterSetConfig()

    qa_sets = QaSets(store)
    qa_version = None
    inputs: dict[str, bytes] = {}
    train, qa_version = _resolve_qa(store, qa_sets, request.domain, request.train, "training", qa_version)
    inputs["train.jsonl"] = to_jsonl(train)
    eval_count = 0
    if request.evaluation is not None:
        evaluation, qa_version = _resolve_qa(
            store, qa_sets, request.domain, request.evaluation, "evaluation", qa_version
        )
        inputs["eval.jsonl"] = to_jsonl(evaluation)
        eval_count = len(evaluation)
    recon = request.reconstruction
    if recon is not None and (recon.uri is not None or recon.sentences is not None):
        sentences = recon.sentences if recon.sentences is not None else _read_lines(store, recon.uri)
        sentences = [s.strip() for s in sentences if s.strip()]
        if not sentences:
            raise InvalidRun("the reconstruction corpus holds no sentence")
        inputs["reconstruction.txt"] = ("\n".join(sentences) + "\n").encode()
    elif recon is not None and hp.reconstruction_ratio == 0:
        raise InvalidRun("a reconstruction corpus is given but reconstruction_ratio is 0")

    retriever_steps = _retriever_steps(request, train, passage_count)
    joint_steps = _joint_steps(request, len(train))
    if retriever_steps + joint_steps == 0:
        raise InvalidRun("nothing to train: no retriever steps and no QA examples for the joint phase")
    stored_request = request.model_copy(
        update={
            "train": QaSource(uri=f"runs/{run_id}/inputs/train.jsonl", synthetic=request.train.synthetic),
            "evaluation": QaSource(uri=f"runs/{run_id}/inputs/eval.jsonl")
            if eval_count
            else request.evaluation,
            "reconstruction": (
                recon.model_copy(
                    update={"uri": f"runs/{run_id}/inputs/reconstruction.txt", "sentences": None}
                )
                if "reconstruction.txt" in inputs
                else recon
            ),
            "hyperparameters": hp.model_copy(update={"lora": lora, "retriever_steps": retriever_steps}),
        }
    )
    record = RunRecord(
        id=run_id,
        domain=request.domain,
        mode=request.mode,
        state=RunState.VALIDATING,
        total_steps=retriever_steps + joint_steps,
        created_at=now(),
        parent=parent,
        promote=request.promote,
        request=stored_request,
        qa_version=qa_version,
        metadata=request.metadata,
    )
    return Prepared(record=record, inputs=inputs)


def _retriever_steps(request: RunRequest, train: list[QaExample], passage_count: int) -> int:
    """Steps of the retriever phase: as asked, or `retriever_epochs` over the retrieval pairs (inverse-cloze
    pairs of every passage, real questions with gold passages, the passages questions are generated for)."""
    hp = request.hyperparameters
    if not {"question", "passage"} & set(request.components):
        return 0
    if hp.retriever_steps is not None:
        return hp.retriever_steps
    synthetic = request.train.synthetic
    pairs = sum(1 for e in train if e.passage_ids)
    if synthetic is not None and synthetic.ict is not None:
        pairs += min(passage_count, synthetic.ict.max_pairs or passage_count)
    if synthetic is not None and synthetic.generated is not None:
        pairs += min(passage_count, synthetic.generated.max_passages)
    return math.ceil(hp.retriever_epochs * pairs / hp.retriever_batch_size)


def _joint_steps(request: RunRequest, examples: int) -> int:
    """Steps of the joint (End2End) phase: as asked, or `epochs` over the real QA examples. A run with nothing
    to answer (no QA examples, none generated, no reconstruction) has no joint phase."""
    hp = request.hyperparameters
    synthetic = request.train.synthetic
    generated = synthetic is not None and synthetic.generated is not None
    if not examples and not generated and hp.reconstruction_ratio == 0:
        if hp.steps is not None or hp.epochs is not None:
            raise InvalidRun(
                "no QA examples to train the joint phase on: drop steps/epochs, or give QA "
                "examples, generated questions or a reconstruction_ratio"
            )
        return 0
    if hp.marginal_weight + hp.contrastive_weight + hp.lm_supervision_weight == 0:
        raise InvalidRun("marginal_weight, contrastive_weight and lm_supervision_weight are all 0")
    if hp.epochs is None:
        return hp.steps or DEFAULT_STEPS
    if not examples:
        raise InvalidRun("epochs count passes over the real QA examples and there are none: give steps")
    qa_rows_per_step = hp.batch_size * hp.grad_accumulation * (1.0 - hp.reconstruction_ratio)
    return max(1, math.ceil(hp.epochs * examples / qa_rows_per_step))


def _check_qlora(cuda_available: bool | None) -> None:
    import importlib.util

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        raise InvalidRun("quantize_generator='4bit' (QLoRA) needs a CUDA device; this host has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidRun(
            "quantize_generator='4bit' needs the bitsandbytes package (pip install 'ragadapt[gpu]')"
        )


def _resolve_qa(
    store: ObjectStore, qa_sets: QaSets, domain: str, source: QaSource, what: str, qa_version: str | None
) -> tuple[list[QaExample], str | None]:
    if not source.real:
        return [], qa_version
    if source.examples is not None:
        try:
            examples = [
                example_from_record(e.model_dump(exclude_none=True), line=i + 1)
                for i, e in enumerate(source.examples)
            ]
        except InvalidQaSet as exc:
            raise InvalidRun(f"{what} example {exc}") from exc
    elif source.uri is not None:
        data = _read_object(store, source.uri, what)
        try:
            examples = parse_qa_jsonl(data)
        except InvalidQaSet as exc:
            raise InvalidRun(f"{what} data {source.uri}: {exc}") from exc
    else:
        if qa_version is None:
            manifest = qa_sets.latest(domain)
            if manifest is None:
                raise InvalidRun(
                    f"domain {domain!r} has no QA set to take the {source.split!r} split from; "
                    "give examples or a uri"
                )
            qa_version = manifest.version
        examples = qa_sets.load(domain, qa_version).split(source.split)
    if not examples:
        where = f"split {source.split!r} of the QA set" if source.split else "the given data"
        raise InvalidRun(f"no {what} examples in {where}")
    return examples, qa_version


def _read_object(store: ObjectStore, uri: str, what: str) -> bytes:
    """A store key, or `s3://<bucket>/<key>` naming the store's own bucket (the one in `store.name()`)."""
    key = uri
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        served = store.name()  # what clients may see: no server paths
        if not served.startswith(f"s3://{bucket}@"):
            raise InvalidRun(f"{what} uri {uri} names bucket {bucket!r}, which is not this store ({served})")
    try:
        return store.get_bytes(key)
    except ObjectNotFound as exc:
        raise InvalidRun(f"{what} uri {uri} names no object in the store") from exc
    except InvalidKey as exc:
        raise InvalidRun(f"{what} uri {uri} is not a valid store key: {exc}") from exc


def _read_lines(store: ObjectStore, uri: str) -> list[str]:
    data = _read_object(store, uri, "reconstruction")
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidRun(f"reconstruction uri {uri} is not UTF-8 text ({exc.reason})") from exc
