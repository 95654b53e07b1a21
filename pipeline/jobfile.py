"""Job file -> `JobSpec`: YAML load, `--set dotted.key=value` overrides, validation.

This is the first thing a run does and the only place a bad configuration is reported: every problem
(unreadable file, YAML syntax, duplicate key, bad override, unknown key, wrong type, bad enum value,
cross-field rule) becomes a `JobFileError` whose str is ONE line naming the file and the dotted key,
e.g. ``jobs/x.yaml: model.bsae: unknown key (did you mean 'base'?)``. Nothing here touches storage or
Ray, so a malformed job fails before any work starts.

Layers, each over the one before: the job file, then `--profile` files (`profiles/NAME.yaml` next to the
job file or the shipped `jobs/profiles/NAME.yaml`: settings for a kind of machine, e.g. `local`), then
`--set` overrides.
"""
from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from schemas.job import FieldRuleError, JobSpec

_KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SHIPPED_PROFILES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "profiles")
_MAX_SHOWN = 60


class JobFileError(ValueError):
    """A job file (or its overrides) is invalid. str(error) is one line: 'FILE: KEY: MESSAGE'."""

    def __init__(self, path: str, message: str, key: Optional[str] = None) -> None:
        self.path, self.key, self.message = path, key, message
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


def load_job(path: str | os.PathLike, overrides: Iterable[str] = (), profiles: Iterable[str] = ()) -> JobSpec:
    """Read a job file, apply profiles and overrides, validate; raise `JobFileError` (one line) on any problem."""
    shown = os.fspath(path)
    data = _read_yaml(shown)
    profiled: list[str] = []
    for name in profiles:
        for key, value in _profile_settings(shown, name):
            _set_dotted(shown, data, key, value)
            profiled.append(key)
    overridden: list[str] = []
    for item in overrides:
        key, value = parse_override(shown, item)
        _set_dotted(shown, data, key, value)
        overridden.append(key)
    _drop_other_strategy_keys(data, profiled + overridden)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(shown, exc, data, overridden) from None
    return _read_template_file(shown, job)


def _read_template_file(shown: str, job: JobSpec) -> JobSpec:
    """chat.template_file -> chat.template, so the actors need not see the file."""
    path = job.chat.template_file
    if not path:
        return job
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(shown, f"cannot read {path!r} ({exc.__class__.__name__}: {exc.strerror or exc})", "chat.template_file") from None
    if not text.strip():
        raise JobFileError(shown, f"{path!r} is empty", "chat.template_file")
    return job.model_copy(update={"chat": job.chat.model_copy(update={"template": text})})


# ---------------------------------------------------------------------------------------------------
# YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            continue  # PyYAML itself reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise JobFileError(path, f"cannot read job file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise JobFileError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise JobFileError(path, f"{where}invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise JobFileError(path, f"invalid YAML: {_squash(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobFileError(path, f"top level must be a mapping of sections, got {_type_name(data)}")
    return data


# ---------------------------------------------------------------------------------------------------
# Profiles and overrides


def profile_path(job_path: str, name: str) -> str:
    """A profile NAME -> `profiles/NAME.yaml` next to the job file, else the shipped one; a path as given."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return name
    for folder in (os.path.join(os.path.dirname(job_path), "profiles"), SHIPPED_PROFILES):
        candidate = os.path.join(folder, f"{name}.yaml")
        if os.path.isfile(candidate):
            return candidate
    shipped = sorted(n[:-5] for n in os.listdir(SHIPPED_PROFILES) if n.endswith(".yaml")) if os.path.isdir(SHIPPED_PROFILES) else []
    raise JobFileError(job_path, f"--profile {name}: no such profile (profiles/{name}.yaml next to the job file or "
                       f"in jobs/profiles/; shipped: {', '.join(shipped) or 'none'})")


def _profile_settings(job_path: str, name: str) -> list[tuple[str, Any]]:
    """The profile's settings as (dotted key, value) pairs, leaves only (a profile's section adds to the
    job file's section instead of replacing it)."""
    def leaves(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return list(leaves(_read_yaml(profile_path(job_path, name)), ""))


def parse_override(path: str, item: str) -> tuple[str, Any]:
    """'a.b.c=value' -> ('a.b.c', value parsed as a YAML scalar; empty = null)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not all(_KEY_PART.match(part) for part in key.split(".")):
        raise JobFileError(path, f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. input.uri=s3://bucket/in/")
    return key, _parse_value(path, key, raw)


def _parse_value(path: str, key: str, raw: str) -> Any:
    text = raw.strip()
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        if text[:1] in "[{\"'":
            raise JobFileError(path, f"--set {key}: value {text!r} is not valid YAML", key=None) from None
        return raw
    # A scalar is wanted; 'Describe: the image' parses as a mapping, so only explicit [..] / {..}
    # flow collections are kept as collections.
    if isinstance(value, (dict, list)) and text[:1] not in "[{":
        return raw
    return value


def _set_dotted(path: str, data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise JobFileError(path, f"--set {key}: {parent} is a {_type_name(child)}, not a section")
        node = child
    node[parts[-1]] = value


def _drop_other_strategy_keys(data: dict, overridden: Sequence[str]) -> None:
    """`--set pruning.mode=none` on a file with `pruning.threshold` switches strategy: keys from the
    file that the newly selected strategy does not have are dropped (keys set by --set are kept)."""
    for key in overridden:
        parts = key.split(".")
        if parts[-1] != "mode" or len(parts) < 2:
            continue
        section = _get_dotted(data, parts[:-1])
        selected = _model_at(parts[:-1], data)
        if not isinstance(section, dict) or selected is None:
            continue
        prefix = ".".join(parts[:-1]) + "."
        for name in list(section):
            if name not in selected.model_fields and prefix + str(name) not in overridden:
                del section[name]


def _get_dotted(data: Any, parts: Sequence[str]) -> Any:
    for part in parts:
        data = data.get(part) if isinstance(data, dict) else None
    return data


# ---------------------------------------------------------------------------------------------------
# Validation errors -> one line


def _first_error(path: str, exc: ValidationError, data: dict, overridden: Sequence[str]) -> JobFileError:
    errors = exc.errors()
    parts, message = _describe(errors[0], data)
    key = ".".join(parts) if parts else None
    if key and any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden):
        message += " (set by --set)"
    others = len({tuple(_key_parts(e["loc"], data)) for e in errors}) - 1
    if others > 0:
        message += f" (+{others} more error{'s' if others > 1 else ''})"
    return JobFileError(path, message, key=key)


def _describe(error: dict, data: dict) -> tuple[list[str], str]:
    parts = _key_parts(error["loc"], data)
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return parts, "field required"
    if kind == "extra_forbidden":
        return parts, "unknown key" + _suggestion(parts, data)
    if kind == "literal_error":
        expected = ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return parts, f"unknown value {_show(value)} (expected one of {expected})"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag_key = ctx.get("discriminator", "'mode'").strip("'")
        expected = ", ".join(_union_tags(parts, data, tag_key))
        if kind == "union_tag_not_found":
            return parts + [tag_key], f"field required (one of {expected})"
        return parts + [tag_key], f"unknown value {_show(ctx.get('tag'))} (expected one of {expected})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return parts, f"expected a mapping of keys ({_got(value)})"
    if kind in ("value_error", "assertion_error"):
        cause = ctx.get("error")
        if isinstance(cause, FieldRuleError):
            return parts + cause.field.split("."), str(cause)
        return parts, str(cause) if cause is not None else error["msg"]
    if kind.endswith("_type") and len(error["loc"]) > 0 and str(error["loc"][-1]) not in parts[-1:]:
        # a scalar union (storage.extra values): pydantic reports one error per member type
        return parts, f"expected a string, number or boolean ({_got(value)})"
    message = error["msg"][:1].lower() + error["msg"][1:]
    return parts, f"{message} ({_got(value)})"


def _key_parts(loc: tuple, data: Any) -> list[str]:
    """The user's dotted key for a pydantic `loc`.

    pydantic inserts union-member labels into `loc` ('glimpse' for the pruning union, 'int'/'str' for
    scalar unions); they are the loc items that do not exist in the data, so walking the data drops them.
    """
    parts: list[str] = []
    node = data
    for depth, item in enumerate(loc):
        if isinstance(node, dict) and item in node:
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, dict) and depth == len(loc) - 1:
            parts.append(str(item))  # a missing or unknown key
            node = None
        elif isinstance(node, list) and isinstance(item, int):
            parts.append(str(item))
            node = node[item] if item < len(node) else None
    return parts


def _model_at(parts: Sequence[str], data: Any) -> Optional[type[BaseModel]]:
    """The model class that owns keys under `parts` (following the pruning union by its `mode`)."""
    cls: Optional[type[BaseModel]] = JobSpec
    node = data
    for part in parts:
        field = cls.model_fields.get(part) if cls else None
        if field is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        cls = _pick_model(field.annotation, node)
    return cls


def _pick_model(annotation: Any, node: Any) -> Optional[type[BaseModel]]:
    members = [m for m in _flatten(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(members) == 1:
        return members[0]
    mode = node.get("mode") if isinstance(node, dict) else None
    return next((m for m in members if m.model_fields.get("mode") and m.model_fields["mode"].default == mode), None)


def _flatten(annotation: Any) -> list:
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [member for arg in args for member in _flatten(arg)]


def _union_tags(parts: Sequence[str], data: Any, tag_key: str) -> list[str]:
    owner = _model_at(parts[:-1], data)
    field = owner.model_fields.get(parts[-1]) if owner and parts else None
    if field is None:
        return []
    members = [m for m in _flatten(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return [str(m.model_fields[tag_key].default) for m in members if tag_key in m.model_fields]


def _suggestion(parts: Sequence[str], data: Any) -> str:
    owner = _model_at(parts[:-1], data)
    if owner is None or not parts:
        return ""
    close = difflib.get_close_matches(parts[-1], list(owner.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _got(value: Any) -> str:
    return "got null" if value is None else f"got {_type_name(value)} {_show(value)}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _type_name(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _squash(exc: Exception) -> str:
    return " ".join(str(exc).split())
