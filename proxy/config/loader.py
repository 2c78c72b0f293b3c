"""Load a policy file: YAML with `${VAR}` / `${VAR:-default}` interpolation, validated by pydantic.

Every error names the file, the line and the field path, so `llm-numbers-proxy check` can list
them all at once (field errors and cross-references in one pass) and hot reload can log exactly what
is wrong; warnings (plaintext secrets, globs that match nothing) never stop a load.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config.models import PolicyFile
from proxy.config.references import embedder_label

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    path: str
    message: str
    warning: bool = False  # served as written, but worth a look (`check` exits 0)

    def __str__(self) -> str:
        where = self.path or "(root)"
        return f"{self.file}:{self.line}: {where}: {'warning: ' if self.warning else ''}{self.message}"


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Builder:
    """Turns a composed YAML node tree into Python values, remembering each path's line."""

    def __init__(self, file: str, env: Mapping[str, str]):
        self.file = file
        self.env = env
        self.lines: dict[Path_, int] = {}
        self.issues: list[ConfigIssue] = []
        self.interpolated: set[Path_] = set()  # scalars that came from `${VAR}`, not written in the file

    def build(self, node: yaml.Node, path: Path_ = ()) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, (*path, "<key>"))
                if key in out:
                    self._issue((*path, key), key_node, "duplicate key")
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        value = yaml.SafeLoader.construct_object(_SCALAR_LOADER, node)
        if isinstance(value, str) and "${" in value:
            self.interpolated.add(path)
            return self._interpolate(value, path, node)
        return value

    def _interpolate(self, value: str, path: Path_, node: yaml.Node) -> str:
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self._issue(path, node, f"environment variable {name} is not set (use ${{{name}:-default}})")
            return ""

        return _ENV_REF.sub(sub, value)

    def _issue(self, path: Path_, node: yaml.Node, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, node.start_mark.line + 1, _dotted(path), message))

    def line_of(self, path: Path_) -> int:
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                return self.lines[path[:cut]]
        return 1


_SCALAR_LOADER = yaml.SafeLoader("")


def parse_policy_text(
    text: str,
    file: str = "<string>",
    env: Mapping[str, str] | None = None,
    warnings: list[ConfigIssue] | None = None,
) -> PolicyFile:
    """Parse and validate policy YAML; raise ConfigError listing every problem found. Warnings (a valid
    file that will not do what it seems to say) go to `warnings` when a list is given."""
    env = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([ConfigIssue(file, line, "", f"YAML syntax error: {problem}")]) from None
    if node is None:
        raise ConfigError([ConfigIssue(file, 1, "", "the policy file is empty")])
    builder = _Builder(file, env)
    raw = builder.build(node)
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue(file, 1, "", "the policy file must be a mapping at the top level")])
    issues = list(builder.issues)
    _resolve_router_paths(raw, file)
    policy, field_errors, pruned = _validate_all(raw)
    issues += [ConfigIssue(file, builder.line_of(loc), _dotted(loc), msg) for loc, msg in field_errors]
    if policy is not None:
        for loc, msg in policy.reference_errors():
            if not _echoes_a_left_out_part(loc, msg, pruned):
                issues.append(ConfigIssue(file, builder.line_of(loc), _dotted(loc), msg))
        base = Path(file).parent if file != "<string>" else Path.cwd()
        policy, verifier_issues = _resolve_verifiers(policy, base)
        for loc, msg in verifier_issues:
            issues.append(ConfigIssue(file, builder.line_of(loc), _dotted(loc), msg))
    if issues or policy is None:
        raise ConfigError(issues)
    if warnings is not None:
        for loc, msg in [*policy.capacity_warnings(), *policy.warnings(builder.interpolated)]:
            warnings.append(ConfigIssue(file, builder.line_of(loc), _dotted(loc), msg, warning=True))
    return policy


def _verifier_error(path: Path, want: str) -> str | None:
    """Why a verifier file cannot serve an embedder labelled `want` (read here as plain JSON: the
    config layer does not import retrieval; proxy.retrieval.verifier checks the rest when it loads)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        return f"cannot read the verifier file {path}: {e.strerror}"
    except (UnicodeDecodeError, ValueError):
        return f"{path} is not a verifier file (invalid JSON)"
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("llm-numbers-proxy/verifier@"):
        return f"{path} is not a verifier file (write one with `llm-numbers-proxy kb calibrate --write-verifier`)"
    if data.get("embedder") != want:
        return (
            f"the verifier was trained on cosines of {data.get('embedder')!r}, but the collection embeds with "
            f"{want!r}: retrain it for this embedder (kb calibrate --write-verifier)"
        )
    return None


def _resolve_verifiers(policy: PolicyFile, base: Path) -> tuple[PolicyFile, list[tuple[tuple[str | int, ...], str]]]:
    """Verifier paths relative to the policy file, made absolute; a file for another embedder is an error."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    resolved = []
    for i, p in enumerate(policy.policies):
        r = p.retrieve
        if r is None or r.verifier is None:
            resolved.append(p)
            continue
        path = (base / r.verifier).resolve()
        coll = policy.collections.get(r.collection)
        if coll is not None and (msg := _verifier_error(path, embedder_label(policy, coll.embedder))):
            errors.append((("policies", i, "retrieve", "verifier"), msg))
        resolved.append(p.model_copy(update={"retrieve": r.model_copy(update={"verifier": str(path)})}))
    if any(a is not b for a, b in zip(resolved, policy.policies, strict=True)):
        policy = policy.model_copy(update={"policies": resolved})
    return policy, errors


def _resolve_router_paths(raw: dict[str, Any], file: str) -> None:
    """`route.learned.router` and `.local_model` are relative to the policy file's folder (as they sit beside it)."""
    base = Path(file).parent if Path(file).is_file() else Path.cwd()
    policies = raw.get("policies")
    for p in policies if isinstance(policies, list) else ():
        learned = (
            p.get("route", {}).get("learned") if isinstance(p, dict) and isinstance(p.get("route"), dict) else None
        )
        for key in ("router", "local_model") if isinstance(learned, dict) else ():
            if isinstance(learned.get(key), str) and learned[key]:
                learned[key] = str(base / learned[key])


_NAMED_SECTIONS = ("models", "teams", "tasks", "collections")


def _echoes_a_left_out_part(loc: Path_, msg: str, pruned: list[Path_]) -> bool:
    """A cross-reference error caused by leaving a faulty part out: a reference to a left-out entry
    (`unknown model 'b'`), or a check in the same entry about the field that was left out (`needs params_b`)."""
    for path in pruned:
        if len(path) == 2 and path[0] in _NAMED_SECTIONS and f"'{path[1]}'" in msg:
            return True
        if len(path) > 2 and loc[:2] == path[:2] and str(path[-1]) in msg:
            return True
    return False


def _validate_all(raw: dict[str, Any]) -> tuple[PolicyFile | None, list[tuple[Path_, str]], list[Path_]]:
    """Validate `raw`; on field errors, leave each faulty part out and validate again, so that the
    cross-references of the rest can be checked in the same pass. Returns the policy of what remained
    valid (None when nothing could be salvaged), the field errors, and the paths of the parts left out.

    Only the first round's field errors are reported: what a later round finds is mostly the echo of a
    part left out (a required field now missing, a sibling that needed it)."""
    errors: list[tuple[Path_, str]] = []
    pruned: list[Path_] = []
    work = copy.deepcopy(raw)
    for round_ in range(8):  # each round removes at least one part; nested faults need a few rounds
        try:
            return PolicyFile.model_validate(work), errors, pruned
        except ValidationError as e:
            found = [(_loc(err), err) for err in e.errors()]
        progress = False
        for loc, err in found:
            issue = (loc, "unknown key" if err["type"] == "extra_forbidden" else err["msg"])
            if round_ == 0 and issue not in errors:
                errors.append(issue)
            removed = _remove(work, loc if err["type"] != "missing" else loc[:-1])
            if removed is None:
                continue
            progress = True
            pruned.append(removed)
        if not progress:
            break
    return None, errors, pruned


def _loc(err: Any) -> Path_:
    return tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p == "[key]")))


def _remove(work: dict[str, Any], loc: Path_) -> Path_ | None:
    """Remove the part at `loc` (its nearest enclosing mapping entry); where a policy in the `policies`
    list is at fault, put a neutral one in its place so later policies keep their indexes. The path
    removed, or None when nothing is left to remove (a missing top-level section)."""
    for cut in range(len(loc), 0, -1):
        path = loc[:cut]
        parent = _at(work, path[:-1])
        key = path[-1]
        if path[:1] == ("policies",) and len(path) == 2 and isinstance(parent, list) and isinstance(key, int):
            if key < len(parent):
                parent[key] = {"name": f"left-out-{key}", "reject": {}}
                return path
        elif isinstance(parent, dict) and key in parent:
            del parent[key]
            return path
    return None


def _at(work: Any, path: Path_) -> Any:
    for part in path:
        in_dict = isinstance(work, dict) and part in work
        if not in_dict and not (isinstance(work, list) and isinstance(part, int) and 0 <= part < len(work)):
            return None
        work = work[part]
    return work


def load_policy_file(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, warnings: list[ConfigIssue] | None = None
) -> PolicyFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue(str(p), 1, "", f"cannot read the policy file: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(p), 1, "", "the policy file is not UTF-8 text")]) from None
    return parse_policy_text(text, str(p), env, warnings)
