"""The Grafana dashboard queries only series the service exports, and shows data once there is traffic."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import ADMIN_TOKEN

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ragadapt.json"

# PromQL words that are not metric names: operators, modifiers, and literals.
KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "info": ("_info",),
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, regexes, variables inside them
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors, $__rate_interval
    # label lists of aggregations and vector matching
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation
        if match.group() not in KEYWORDS:
            names.add(match.group())
    return names


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, promql)`` for every panel target and every query variable."""
    queries = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            series = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            queries.append((f"variable {variable['name']!r}", series.group(1) if series else query))
    return queries


def exported_series(exposition: str) -> dict[str, str]:
    """Every series name the exposition's metric families can produce (also those with no sample yet, such as
    labelled counters nothing has incremented), mapped to the family's type."""
    series = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            series[family.name + suffix] = family.type
    return series


def test_promql_metric_names_are_told_apart_from_functions_labels_and_variables():
    expr = (
        "histogram_quantile(0.95, sum by (le, domain) (rate(ragadapt_ask_stage_seconds_bucket"
        '{domain=~"$domain", stage="total"}[$__rate_interval]))) / ignoring(x) group_left '
        "sum(up offset 5m) * 1e-3 + on(instance) foo:bar_total"
    )
    assert promql_metric_names(expr) == {"ragadapt_ask_stage_seconds_bucket", "up", "foo:bar_total"}


def test_exported_series_expand_counters_and_histograms():
    text = (
        '# TYPE a_total counter\na_total{x="1"} 1\n# TYPE b histogram\n'
        'b_bucket{le="+Inf"} 0\nb_count 0\nb_sum 0\n# TYPE c gauge\n# TYPE d counter\n'
    )
    series = exported_series(text)
    assert {"a_total", "b_bucket", "b_count", "b_sum", "c", "d_total"} <= set(series)
    assert "a" not in series and "b" not in series


@pytest.fixture(scope="module")
def metrics_after_traffic(tiny_service) -> str:
    """/metrics after creating a domain, waiting for its index and asking it two questions."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    passages = [
        {"id": "p1", "title": "covid", "text": "the incubation period is five days"},
        {"id": "p2", "title": "geo", "text": "the capital of france is paris"},
    ]
    with httpx.Client(base_url=tiny_service, timeout=60) as http:
        created = http.post("/admin/domains", json={"name": "dash", "passages": passages}, headers=admin)
        assert created.status_code == 202, created.text
        job_id = created.json()["job"]["id"]
        deadline = time.monotonic() + 300
        while (job := http.get(f"/admin/jobs/{job_id}", headers=admin).json())["state"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, "the ingest job did not finish"
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        for question in ("what is the incubation period", "what is the capital of france"):
            answered = http.post(
                "/ask", params={"domain": "dash"}, json={"question": question, "max_new_tokens": 3}
            )
            assert answered.status_code == 200, answered.text
        assert http.post("/ask", params={"domain": "missing"}, json={"question": "x"}).status_code == 404
        return http.get("/metrics").text


def test_every_dashboard_query_selects_exported_series(metrics_after_traffic):
    exported = exported_series(metrics_after_traffic)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 20
    missing = {
        f"{where}: {name}"
        for where, expr in queries
        for name in promql_metric_names(expr)
        if name not in exported
    }
    assert not missing, "series the dashboard queries but /metrics lacks:\n" + "\n".join(sorted(missing))


def test_every_exported_family_is_on_the_dashboard(metrics_after_traffic):
    """A metric the service adds without a panel is a metric nobody looks at."""
    used = {
        name
        for _, expr in dashboard_queries(json.loads(DASHBOARD.read_text()))
        for name in promql_metric_names(expr)
    }
    all_families = {family.name for family in text_string_to_metric_families(metrics_after_traffic)}
    # `x_created` (when a counter or histogram child was created) comes as a family of its own beside `x`.
    families = {
        name
        for name in all_families
        if name.startswith("ragadapt_")
        and not (name.endswith("_created") and name.removesuffix("_created") in all_families)
    }
    shown = {
        family for family in families if any(name == family or name.startswith(family + "_") for name in used)
    }
    assert families - shown == set()


def test_traffic_shows_up_in_the_series_the_main_panels_use(metrics_after_traffic):
    families = text_string_to_metric_families(metrics_after_traffic)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in families
        for sample in family.samples
    }

    def has(name: str, **labels: str) -> bool:
        return any(
            sample_name == name and set(labels.items()) <= set(sample_labels)
            for sample_name, sample_labels in samples
        )

    assert has("ragadapt_ask_requests_total", domain="dash", code="ok")
    assert has("ragadapt_ask_requests_total", code="domain_not_found")
    assert has("ragadapt_ask_stage_seconds_bucket", domain="dash", stage="total")
    assert has("ragadapt_ask_stage_seconds_bucket", domain="dash", stage="generate")
    assert has("ragadapt_answer_tokens_total", domain="dash")
    assert has("ragadapt_batch_rows_bucket") and has("ragadapt_batch_adapters_bucket")
    assert has("ragadapt_index_rebuild_seconds_bucket", kind="ingest")
    assert has("ragadapt_live_version_info", domain="dash", adapter_version="base")
    assert has("ragadapt_http_requests_total", route="/ask", status="200")
    assert has("ragadapt_backbone_ready")


def test_dashboard_is_provisionable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ragadapt" and dashboard["title"] == "ragadapt"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable.startswith("__") or variable in variables, (panel["title"], variable)
