"""docs/metrics.md and the metrics the code declares are the same set: names, types and label sets.

The code side is read live: every module under proxy/ that builds a prometheus_client metric is imported
and its metric objects collected, and the default registry is checked for any proxy metric defined
elsewhere. Whoever adds a metric documents it in the same change, or this fails.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "docs" / "metrics.md"
PROXY = ROOT / "proxy"
METRIC_CLASSES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
OUR_PREFIXES = ("llm_proxy_", "gen_ai_")
# How gauges combine across `serve --workers N` (prometheus_client multiprocess mode). "all" (the
# default) exports one series per worker pid: unbounded across restarts and wrong to sum in a panel.
GAUGE_MODES = {"livesum", "liveall", "livemax", "livemin", "livemostrecent", "sum", "max", "min", "mostrecent"}


@dataclass(frozen=True)
class Declared:
    name: str  # as exported: counters carry _total
    type: str
    labels: frozenset[str]
    where: str


@dataclass(frozen=True)
class Documented:
    name: str
    type: str
    unit: str
    labels: frozenset[str]
    meaning: str


def _exported_name(metric: MetricWrapperBase) -> str:
    return metric._name + "_total" if metric._type == "counter" else metric._name


def _modules_building_metrics() -> list[str]:
    """Modules under proxy/ that call a prometheus_client metric class (found by reading their source)."""
    found = []
    for path in sorted(PROXY.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prometheus_client")
            for alias in node.names
            if alias.name in METRIC_CLASSES
        }
        builds = any(
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id in imported)
                or (
                    isinstance(node.func, ast.Attribute)
                    and node.func.attr in METRIC_CLASSES
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in {"prometheus_client", "prom"}
                )
            )
            for node in ast.walk(tree)
        )
        if builds:
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def declared_metrics() -> dict[str, Declared]:
    out: dict[str, Declared] = {}
    for module_name in _modules_building_metrics():
        module = importlib.import_module(module_name)
        for attr, value in vars(module).items():
            if isinstance(value, MetricWrapperBase):
                name = _exported_name(value)
                out[name] = Declared(name, value._type, frozenset(value._labelnames), f"{module_name}.{attr}")
    return out


def _registry_families() -> dict[str, str]:
    """Exported name → type of every proxy metric in the default registry (after the imports above)."""
    out = {}
    for family in REGISTRY.collect():
        if family.name.startswith(OUR_PREFIXES):
            out[family.name + "_total" if family.type == "counter" else family.name] = family.type
    return out


def parse_catalog(text: str) -> dict[str, Documented]:
    """The rows of the catalog table: | `name` | type | unit | `label`, ... or – | meaning |."""
    rows: dict[str, Documented] = {}
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:5] == ["metric", "type", "unit", "labels", "meaning"]:
            in_table = True
            continue
        if not in_table:
            continue
        if not cells:
            break
        if set(cells[0]) <= {"-", ":"}:
            continue
        name = cells[0].strip("`")
        assert len(cells) == 5, f"docs/metrics.md: the row of {name} needs 5 cells, has {len(cells)}"
        assert name not in rows, f"docs/metrics.md lists {name} twice"
        labels = frozenset(re.findall(r"`([a-z_][a-z0-9_]*)`", cells[3]))
        rows[name] = Documented(name, cells[1], cells[2], labels, cells[4])
    return rows


def catalog_differences(documented: dict[str, Documented], declared: dict[str, Declared]) -> list[str]:
    problems = []
    for name in sorted(declared.keys() - documented.keys()):
        d = declared[name]
        problems.append(f"{name} ({d.type}, labels {sorted(d.labels)}, {d.where}) is not in docs/metrics.md")
    for name in sorted(documented.keys() - declared.keys()):
        problems.append(f"docs/metrics.md lists {name}, which no module under proxy/ declares")
    for name in sorted(documented.keys() & declared.keys()):
        doc, code = documented[name], declared[name]
        if doc.type != code.type:
            problems.append(f"{name}: docs/metrics.md says {doc.type}, {code.where} is a {code.type}")
        if doc.labels != code.labels:
            problems.append(
                f"{name}: docs/metrics.md labels {sorted(doc.labels)}, {code.where} labels {sorted(code.labels)}"
            )
    return problems


@pytest.fixture(scope="module")
def documented() -> dict[str, Documented]:
    rows = parse_catalog(CATALOG.read_text(encoding="utf-8"))
    assert rows, "docs/metrics.md has no metric table (| metric | type | unit | labels | meaning |)"
    return rows


@pytest.fixture(scope="module")
def declared() -> dict[str, Declared]:
    found = declared_metrics()
    assert "llm_proxy_requests_total" in found, "proxy/metrics.py was not found or declares no metric"
    return found


def test_catalog_and_code_declare_the_same_metrics_types_and_labels(documented, declared):
    problems = catalog_differences(documented, declared)
    assert not problems, "docs/metrics.md and the code differ:\n  " + "\n  ".join(problems)


def test_registry_holds_no_proxy_metric_the_catalog_lacks(documented, declared):
    # A metric built outside a module attribute (in a function, on a class) still lands in the registry.
    families = _registry_families()
    missing = sorted(families.keys() - documented.keys())
    assert not missing, f"registered but not in docs/metrics.md: {missing}"
    wrong = {n: (t, documented[n].type) for n, t in families.items() if n in documented and documented[n].type != t}
    assert not wrong, f"registry type vs docs/metrics.md type: {wrong}"


def test_every_catalog_row_has_a_unit_and_a_meaning_that_fit_the_name(documented):
    for row in documented.values():
        assert row.unit and row.unit not in {"-", "–"}, f"{row.name}: no unit in docs/metrics.md"
        assert len(row.meaning) >= 20, f"{row.name}: say what it means in docs/metrics.md"
        if re.search(r"_seconds(_total)?$", row.name):
            assert row.unit == "seconds", f"{row.name}: a _seconds metric has unit seconds, not {row.unit!r}"
        if re.search(r"_usd(_total)?$", row.name):
            assert row.unit == "USD", f"{row.name}: a _usd metric has unit USD, not {row.unit!r}"
        assert row.name.startswith(OUR_PREFIXES), f"{row.name}: names start with llm_proxy_ or gen_ai_"


def test_every_gauge_says_how_workers_combine(declared):
    for name, d in declared.items():
        if d.type != "gauge":
            continue
        module_name, attr = d.where.rsplit(".", 1)
        mode = getattr(importlib.import_module(module_name), attr)._multiprocess_mode
        assert mode in GAUGE_MODES, f"{d.where} ({name}) needs multiprocess_mode= (one of {sorted(GAUGE_MODES)})"


def test_the_comparison_reports_a_missing_a_stale_and_a_relabelled_metric():
    # The check above must be able to fail: a synthetic catalog that is wrong in each way.
    declared = {
        "a_total": Declared("a_total", "counter", frozenset({"team"}), "m.A"),
        "b": Declared("b", "gauge", frozenset(), "m.B"),
    }
    documented = parse_catalog(
        "| metric | type | unit | labels | meaning |\n|---|---|---|---|---|\n"
        "| `a_total` | counter | requests | `team`, `model` | a meaning long enough |\n"
        "| `c_total` | counter | requests | – | a meaning long enough |\n"
    )
    problems = "\n".join(catalog_differences(documented, declared))
    assert "b (gauge" in problems and "not in docs/metrics.md" in problems
    assert "lists c_total" in problems
    assert "a_total: docs/metrics.md labels ['model', 'team']" in problems
