"""The operator artifacts in deploy/.

promtool checks the Prometheus config, the alert rules and their unit tests; the Grafana
dashboard must be importable, every panel must query Prometheus, and every metric a query
names must be one enduro exports. promtool is required: `make test` installs it.
"""

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "enduro-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "enduro-alerts.test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "enduro-dashboard.json"

# What enduro exports (observability/metrics.py, engine_collector.py, guard/), plus the standard
# process_* and python_gc_* collectors.
ENDURO_METRICS = frozenset(
    {
        "enduro_requests_total",
        "enduro_request_errors_total",
        "enduro_prompt_tokens_total",
        "enduro_generation_tokens_total",
        "enduro_requests_running",
        "enduro_requests_waiting",
        "enduro_kv_cache_blocks",
        "enduro_kv_cache_usage_ratio",
        "enduro_kv_cache_fragmentation_ratio",
        "enduro_kv_cache_bytes",
        "enduro_prefix_cache_queries_tokens_total",
        "enduro_prefix_cache_hits_tokens_total",
        "enduro_preemptions_total",
        "enduro_engine_restarts_total",
        "enduro_process_memory_bytes",
        "enduro_python_heap_bytes",
        "enduro_build_info",
        "enduro_kv_cache_max_blocks",
        "enduro_kv_cache_segments",
        "enduro_kv_cache_segments_grown_total",
        "enduro_kv_cache_segments_released_total",
        "enduro_kv_cache_compaction_moves_total",
        "enduro_allocator_purges_total",
        "enduro_engine_prefill_tokens_total",
        "enduro_engine_decode_tokens_total",
        "enduro_kv_cache_invariant_violations",
        "enduro_prefix_cache_evictions_total",
        "enduro_guard_alerts_total",
        "enduro_guard_actions_total",
        "enduro_guard_active_alerts",
        "enduro_memory_forecast_seconds",
        "enduro_memory_growth_bytes_per_hour",
        "enduro_memory_limit_bytes",
    }
)
ENDURO_HISTOGRAMS = frozenset(
    {
        "enduro_time_to_first_token_seconds",
        "enduro_inter_token_latency_seconds",
        "enduro_request_duration_seconds",
        "enduro_request_queue_seconds",
        "enduro_engine_step_seconds",
    }
)
STANDARD_PREFIXES = ("process_", "python_gc_")

EXPECTED_PANELS = (
    "Time to first token (p50/p90/p99)",
    "Inter-token latency (p50/p90/p99)",
    "End-to-end request duration (p50/p90/p99)",
    "Requests/s by status",
    "Tokens/s (generated, prompt)",
    "Queue (running, waiting)",
    "KV cache usage and fragmentation",
    "KV cache blocks by state",
    "Prefix cache hit rate",
    "Process memory and 24h forecast",
    "Memory growth rate (deriv over 1h)",
    "Engine restarts (15m)",
    "Preemptions/s",
    "Errors/s by reason",
    "Alerts",
)
# Panels that hold no query: layout rows, and the alert list (it reads alert state).
QUERYLESS_PANEL_TYPES = frozenset({"row", "alertlist"})
DATASOURCE_UID = "${DS_PROMETHEUS}"


# --- promtool ------------------------------------------------------------------------------


def run_promtool(*args: str) -> str:
    """Run promtool in deploy/prometheus; fail the test with its output if it fails."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed (it comes with Debian's `prometheus` package): "
            "run `make test`, which installs it, or `apt-get install prometheus`.",
            pytrace=False,
        )
    result = subprocess.run(
        [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(
            f"`promtool {' '.join(args)}` exited {result.returncode}:\n{output}", pytrace=False
        )
    return output


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", RULES.name)


def test_promtool_rule_unit_tests() -> None:
    run_promtool("test", "rules", RULE_TESTS.name)


def test_promtool_check_config() -> None:
    output = run_promtool("check", "config", CONFIG.name)
    assert "1 rule files found" in output


# --- PromQL metric names -------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{\w+(?::\w+)?\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# Not preceded by a word character, '.' or ':', so exponents (1e3) and durations (1d) are skipped.
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
)
_LABEL_VALUES = re.compile(r"\s*label_values\((.*),\s*\w+\s*\)\s*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords dropped)."""
    label_values = _LABEL_VALUES.fullmatch(expr)
    if label_values is not None:  # Grafana's label_values(selector, label)
        expr = label_values.group(1)
    for pattern in (_STRING, _GRAFANA_VARIABLE, _MATCHERS, _RANGE, _GROUPING):
        expr = pattern.sub(" ", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        is_call = expr[match.end() :].lstrip().startswith("(")
        if not is_call and match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def is_enduro_metric(name: str) -> bool:
    if name in ENDURO_METRICS or name.startswith(STANDARD_PREFIXES):
        return True
    histogram, _, series = name.rpartition("_")
    return histogram in ENDURO_HISTOGRAMS and series in {"bucket", "sum", "count"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.99, sum by (le) "
            '(rate(enduro_request_duration_seconds_bucket{job=~"$job"}[$__rate_interval])))',
            {"enduro_request_duration_seconds_bucket"},
        ),
        (
            "a:b:p99_5m / a:b:p99_5m offset 1d > 1.25 and on (job, instance) c >= 1e-1",
            {"a:b:p99_5m", "c"},
        ),
        ("sum(x) by (le) / ignoring(state) group_left y", {"x", "y"}),
        ('label_values(enduro_build_info{job=~"$job"}, instance)', {"enduro_build_info"}),
        (
            'max(time() - process_start_time_seconds{instance="a{b}"})',
            {"process_start_time_seconds"},
        ),
        ("predict_linear(m[6h], 24 * 3600) > 8 * 1024", {"m"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    ("name", "known"),
    [
        ("enduro_requests_total", True),
        ("enduro_engine_step_seconds_bucket", True),
        ("enduro_engine_step_seconds_count", True),
        ("process_resident_memory_bytes", True),
        ("enduro_engine_step_seconds", False),
        ("enduro_requests_total_bucket", False),
        ("vllm:num_requests_running", False),
    ],
)
def test_is_enduro_metric(name: str, known: bool) -> None:
    assert is_enduro_metric(name) is known


# --- alert rules ---------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    with path.open() as file:
        return yaml.safe_load(file)


def rules_of_kind(kind: str) -> list[dict[str, Any]]:
    """The rules of enduro-alerts.yml that are alerts (kind "alert") or recordings ("record")."""
    groups = load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if kind in rule]


def test_every_alert_waits_has_a_severity_and_explains_itself() -> None:
    for rule in rules_of_kind("alert"):
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        for key in ("summary", "description"):
            assert "{{" in rule["annotations"][key], f"{name}: {key} shows no value or label"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in load_yaml(RULE_TESTS)["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in rules_of_kind("alert")}
    assert alerts - firing == set(), "alerts no unit test fires"
    assert alerts - quiet == set(), "alerts no unit test keeps quiet"


def test_rules_query_only_enduro_metrics() -> None:
    recorded = {rule["record"] for rule in rules_of_kind("record")}
    for rule in rules_of_kind("alert") + rules_of_kind("record"):
        for name in metric_names(rule["expr"]):
            assert is_enduro_metric(name) or name in recorded or name == "up", name


# --- Grafana dashboard ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as file:
        loaded: dict[str, Any] = json.load(file)
    return loaded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [target["expr"] for target in panel.get("targets", [])]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, annotations and variable queries."""
    exprs = [expr for panel in all_panels(dashboard) for expr in panel_exprs(panel)]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_every_panel_queries_prometheus(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        if panel["type"] in QUERYLESS_PANEL_TYPES:
            continue
        title = panel["title"]
        assert panel["datasource"]["uid"] == DATASOURCE_UID, title
        assert panel["targets"], f"{title}: no targets"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, title
            assert target["expr"].strip(), f"{title}: empty query"
            assert 'job=~"$job"' in target["expr"], f"{title}: ignores the job variable"


def test_dashboard_has_the_expected_panels(dashboard: dict[str, Any]) -> None:
    titles = [panel["title"] for panel in all_panels(dashboard)]
    assert [title for title in EXPECTED_PANELS if title not in titles] == []
    assert len(titles) == len(set(titles)), "panel titles repeat"


def test_memory_panels_show_trend_and_forecast(dashboard: dict[str, Any]) -> None:
    panels = {panel["title"]: panel for panel in all_panels(dashboard)}
    growth = " ".join(panel_exprs(panels["Memory growth rate (deriv over 1h)"]))
    assert re.search(r"deriv\(enduro_process_memory_bytes\{[^}]*\}\[1h\]\)", growth)
    memory = " ".join(panel_exprs(panels["Process memory and 24h forecast"]))
    assert "predict_linear(enduro_process_memory_bytes{" in memory


def test_dashboard_queries_only_enduro_metrics(dashboard: dict[str, Any]) -> None:
    names = {name for expr in dashboard_exprs(dashboard) for name in metric_names(expr)}
    assert {name for name in names if not is_enduro_metric(name)} == set()
    assert "enduro_requests_total" in names  # the parser found names at all


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses every query, with Grafana's variables replaced by plain values."""

    def plain(expr: str) -> str:
        label_values = _LABEL_VALUES.fullmatch(expr)
        if label_values is not None:
            expr = label_values.group(1)
        expr = re.sub(r"\$__(?:rate_)?interval|\$__range", "5m", expr)
        return _GRAFANA_VARIABLE.sub("x", expr)

    rules = [
        {"record": f"dashboard:query_{i}", "expr": plain(expr)}
        for i, expr in enumerate(dashboard_exprs(dashboard))
    ]
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(rule_file))
