"""`ragadapt adapt` flags become the same RunRequest the HTTP API takes; `ragadapt eval` prints one table."""

from __future__ import annotations

import argparse

import pytest

from adapters.cli import adapt, add_parsers, cmd_eval, request_from_args
from adapters.execution import Workspace
from adapters.spec import RunRequest, RunState


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ragadapt")
    add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_adapt_flags_build_the_api_request():
    args = parse(
        "adapt",
        "--domain",
        "toy",
        "--mode",
        "generator_only",
        "--steps",
        "12",
        "--lr",
        "3e-4",
        "--top-k",
        "3",
        "--lora-r",
        "4",
        "--promote",
        "never",
        "--eval-split",
        "",
    )
    request = request_from_args(args)
    assert request == RunRequest.model_validate(
        {
            "domain": "toy",
            "mode": "generator_only",
            "promote": "never",
            "evaluation": None,
            "hyperparameters": {
                "steps": 12,
                "lr": 3e-4,
                "top_k": 3,
                "lora": {c: {"r": 4} for c in ("question", "passage", "generator")},
            },
        }
    )
    assert request.train.synthetic is not None  # as in a request that leaves `train` out


def test_adapt_flags_for_synthetic_data_and_the_retriever_phase():
    args = parse(
        "adapt",
        "--domain",
        "toy",
        "--passages-only",
        "--generate-questions",
        "50",
        "--no-ict",
        "--retriever-steps",
        "7",
        "--contrastive-weight",
        "0.5",
        "--query-side-only",
        "--promote-metric",
        "recall@5",
    )
    request = request_from_args(args)
    assert request.train.model_dump(exclude_none=True) == {
        "synthetic": {
            "generated": {"max_passages": 50, "shots": 2, "round_trip_k": 20, "max_new_tokens": 48},
            "ratio": 0.5,
        }
    }
    assert not request.train.real
    hp = request.hyperparameters
    assert (hp.retriever_steps, hp.contrastive_weight, hp.query_side_only) == (7, 0.5, True)
    assert request.components == ("question", "generator") and request.refresh_every is None
    assert request.primary_metric == "recall@5"
    plain = request_from_args(parse("adapt", "--domain", "toy", "--train-split", "more", "--no-synthetic"))
    assert plain.train.model_dump(exclude_none=True) == {"split": "more"}


def test_eval_compares_base_and_each_modes_newest_version(
    domain, tiny_config, tiny_backbone, tmp_path, capsys
):
    workspace = Workspace(tiny_config, tmp_path / "work", {"none": tiny_backbone})
    body = {
        "domain": "toy",
        "promote": "never",
        "evaluation": None,
        "hyperparameters": {"steps": 3, "batch_size": 2, "top_k": 2},
    }
    versions = {}
    for mode in ("generator_only", "end2end"):
        info = adapt(
            domain.store,
            tiny_config,
            RunRequest.model_validate({**body, "mode": mode}),
            tmp_path / "work",
            progress=False,
            workspace=workspace,
        )
        assert info.state == RunState.SUCCEEDED, info.error
        versions[mode] = info.adapter_version

    args = parse(
        "eval",
        "--domain",
        "toy",
        "--modes",
        "base,generator_only,end2end",
        "--top-k",
        "2",
        "--max-new-tokens",
        "3",
        "--no-progress",
    )
    assert cmd_eval(args, domain.store, tiny_backbone, tmp_path / "eval") == 0
    table, _, differences = capsys.readouterr().out.partition("\n\n")
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert list(rows) == ["base", "generator_only", "end2end"]
    deltas = {line.split()[0]: line.split()[1:] for line in differences.splitlines()[3:]}
    assert list(deltas) == ["generator_only", "end2end"]
    # F1, EM, then recall@5 of dense, BM25 and hybrid, each "value [low,high]"; BM25 is the same model twice.
    assert all(len(cells) == 10 for cells in deltas.values()) and deltas["end2end"][6:8] == [
        "+0.000",
        "[+0.00,+0.00]",
    ]
    assert rows["base"][1] == "base"
    assert (
        rows["generator_only"][1] == versions["generator_only"] and rows["end2end"][1] == versions["end2end"]
    )
    assert all(row[2] == "2" for row in rows.values())  # both dev questions answered in every mode
    assert tiny_backbone.adapter_sets == []  # evaluation leaves no adapter attached


def test_eval_of_a_mode_without_a_run_says_so(domain, tiny_backbone, tmp_path):
    from adapters.cli import evaluate_modes
    from adapters.errors import InvalidRun

    with pytest.raises(InvalidRun, match="no succeeded end2end run"):
        evaluate_modes(
            domain.store, tiny_backbone, "toy", modes=["end2end"], work_dir=tmp_path, progress=False
        )
