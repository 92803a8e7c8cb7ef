"""JSON recipes: `_base_` inheritance, mmengine merge rules, `--cfg-options`, validation.

A recipe is a JSON object mirroring an mmcls config. Merge rules (mmengine's):
  * `_base_` is a path or a list of paths, relative to the file that names them, loaded
    recursively; two bases of one file may not define the same top-level key;
  * a child dict merges into the base dict key by key, any other value (lists included)
    replaces the base value whole, and `"_delete_": true` in a child dict replaces the base
    dict instead of merging;
  * `--cfg-options a.b.c=VALUE` applies after merging; VALUE is JSON when it parses, else a
    string; a list index may appear in the path (`pipeline.0.padding=2`).

The result is a plain dict. Every error names the file (or `--cfg-options`) and the dotted key.
"""

import copy
import dataclasses
import difflib
import inspect
import json
import os

from . import schema
from .errors import RecipeError

CFG_OPTIONS = "--cfg-options"


def load_recipe(path, cfg_options=None):
    """Load, merge and validate a recipe file; `cfg_options` is a list of "key=value"."""
    origins = {}
    recipe = _load_with_bases(os.path.abspath(path), stack=[], origins=origins)
    for option in cfg_options or []:
        _apply_option(recipe, option, origins)
    validate(recipe, origins)
    return recipe


# --- loading and merging --------------------------------------------------------------------


def _read_json(path, included_from):
    if not os.path.isfile(path):
        where = f" (listed in _base_ of {_show(included_from)})" if included_from else ""
        raise RecipeError(f"{_show(path)}: recipe file not found{where}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RecipeError(f"{_show(path)}: cannot read recipe: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(
            f"{_show(path)}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}"
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{_show(path)}: a recipe must be a JSON object, got {_json_type(data)}")
    return data


def _load_with_bases(path, stack, origins):
    if path in stack:
        chain = " -> ".join(_show(p) for p in stack + [path])
        raise RecipeError(f"{_show(path)}: _base_ cycle: {chain}")
    data = _read_json(path, stack[-1] if stack else None)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{_show(path)}: _base_ must be a path or a list of paths")

    merged, owner = {}, {}
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        base_data = _load_with_bases(base_path, stack + [path], origins)
        for key in base_data:
            if key in merged:
                raise RecipeError(
                    f"{_show(path)}: key '{key}' is defined by two of its bases, "
                    f"{_show(owner[key])} and {_show(base_path)}; a key may come from one base only"
                )
            owner[key] = base_path
        merged.update(base_data)

    _record_origins(data, path, (), origins)
    return merge(merged, data)


def merge(base, child):
    """mmengine's merge: dicts merge key by key, `_delete_: true` replaces, the rest replaces."""
    result = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict):
            value = dict(value)
            delete = value.pop("_delete_", False)
            if not delete and isinstance(result.get(key), dict):
                result[key] = merge(result[key], value)
                continue
            result[key] = merge({}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _record_origins(data, path, prefix, origins):
    """Remember which file set each key, so errors can point at it."""
    for key, value in data.items():
        here = prefix + (key,)
        origins[here] = path
        if isinstance(value, dict):
            _record_origins(value, path, here, origins)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                origins[here + (i,)] = path
                if isinstance(item, dict):
                    _record_origins(item, path, here + (i,), origins)


# --- --cfg-options ---------------------------------------------------------------------------


def parse_value(text):
    """JSON when it parses (numbers, true/false/null, lists, objects), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_option(recipe, option, origins):
    key, sep, raw = option.partition("=")
    if not sep or not key:
        raise RecipeError(
            f"{CFG_OPTIONS}: '{option}' is not KEY=VALUE (example: "
            f"optim_wrapper.optimizer.lr=0.01)"
        )
    parts = key.split(".")
    node, walked = recipe, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(walked) or "the recipe"
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise RecipeError(
                    f"{CFG_OPTIONS}: {key}: {where} is a list; '{part}' is not an index"
                )
            index = int(part)
            if not -len(node) <= index < len(node):
                raise RecipeError(
                    f"{CFG_OPTIONS}: {key}: index {index} out of range, {where} has "
                    f"{len(node)} items"
                )
            part = index
        elif isinstance(node, dict):
            if not last and part not in node:
                # A section the recipe does not set yet (e.g. training_args.bf16=true):
                # create it; validation rejects it if no such key exists.
                node[part] = {}
        else:
            raise RecipeError(
                f"{CFG_OPTIONS}: {key}: {where} is {_json_type(node)} {node!r}, it has no "
                f"key '{part}'"
            )
        walked.append(str(part))
        if last:
            node[part] = parse_value(raw)
            _mark_option(tuple(walked), node[part], origins)
        else:
            node = node[part]


def _mark_option(path, value, origins):
    origins[path] = CFG_OPTIONS
    if isinstance(value, dict):
        _record_origins(value, CFG_OPTIONS, path, origins)


# --- validation ---------------------------------------------------------------------------


def validate(recipe, origins=None):
    """Check every key and type of a merged recipe against `schema.RECIPE`."""
    _Validator(origins or {}).check(recipe, schema.RECIPE, ())


class _Validator:
    def __init__(self, origins):
        self.origins = origins

    def error(self, path, message):
        source = self._source(path)
        key = ".".join(str(p) for p in path) or "(top level)"
        return RecipeError(f"{source}: {key}: {message}")

    def _source(self, path):
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return _show(self.origins[path[:n]])
        return "recipe"

    def check(self, value, spec, path):
        if spec is schema.Anything:
            return
        if spec == "training-args":
            return self.check_training_args(value, path)
        if spec == schema.PIPELINE_STEP:
            return self.check_pipeline_step(value, path)
        if isinstance(spec, schema.OneOf):
            return self.check_one_of(value, spec, path)
        if isinstance(spec, schema.ListOf):
            if not isinstance(value, list):
                raise self.error(path, f"expected a list, got {_describe(value)}")
            for i, item in enumerate(value):
                self.check(item, spec.item, path + (i,))
            return
        if isinstance(spec, schema.Typed):
            return self.check_typed(value, spec, path)
        if isinstance(spec, schema.Section):
            return self.check_section(value, spec, path)
        if not _is_type(value, spec):
            raise self.error(path, f"expected {_type_name(spec)}, got {_describe(value)}")

    def check_one_of(self, value, spec, path):
        errors = []
        for option in spec.options:
            try:
                self.check(value, option, path)
                return
            except RecipeError as e:
                errors.append(e)
        # Report the error of the option whose shape matches the value (dict vs list vs scalar).
        for option, err in zip(spec.options, errors):
            if _shape_matches(value, option):
                raise err
        names = " or ".join(_type_name(o) for o in spec.options)
        raise self.error(path, f"expected {names}, got {_describe(value)}")

    def check_section(self, value, spec, path):
        if not isinstance(value, dict):
            raise self.error(path, f"expected an object, got {_describe(value)}")
        for key, item in value.items():
            if key not in spec.keys:
                if spec.open:
                    continue
                raise self.error(path + (key,), _unknown("key", key, spec.keys))
            self.check(item, spec.keys[key], path + (key,))

    def check_typed(self, value, spec, path):
        if not isinstance(value, dict):
            raise self.error(path, f"expected an object, got {_describe(value)}")
        type_name = value.get("type", spec.default)
        if type_name is None:
            raise self.error(path, f"missing 'type'; known types: {', '.join(spec.types)}")
        if type_name not in spec.types:
            raise self.error(path + ("type",), _unknown("type", type_name, spec.types))
        section = spec.types[type_name]
        for key, item in value.items():
            if key == "type":
                continue
            if key not in section.keys:
                message = _unknown(f"key for {type_name}", key, section.keys)
                raise self.error(
                    path + (key,),
                    message + " (if a base file sets it for another type, write "
                    '"_delete_": true in your section to replace the base section)',
                )
            self.check(item, section.keys[key], path + (key,))

    def check_pipeline_step(self, value, path):
        from .data.transforms import PIPELINE_STEPS

        if not isinstance(value, dict):
            raise self.error(path, f"a pipeline step is an object, got {_describe(value)}")
        name = value.get("type")
        if name not in PIPELINE_STEPS:
            raise self.error(path + ("type",), _unknown("pipeline step", name, PIPELINE_STEPS))
        params = inspect.signature(PIPELINE_STEPS[name]).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in value:
            if key != "type" and key not in params and not accepts_any:
                raise self.error(path + (key,), _unknown(f"argument of {name}", key, params))

    def check_training_args(self, value, path):
        if not isinstance(value, dict):
            raise self.error(path, f"expected an object, got {_describe(value)}")
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        for key in value:
            if key not in known:
                raise self.error(
                    path + (key,), _unknown("transformers.TrainingArguments field", key, known)
                )


# --- small helpers -------------------------------------------------------------------------


def _unknown(what, name, known):
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    listing = ", ".join(known) if len(known) <= 30 else f"{len(known)} known, see the docs"
    return f"unknown {what} {name!r}{hint}; known: {listing}"


def _is_type(value, spec):
    if spec is schema.Number:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is schema.Integer:
        return isinstance(value, int) and not isinstance(value, bool)
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, spec)


def _shape_matches(value, spec):
    if isinstance(spec, (schema.Section, schema.Typed)):
        return isinstance(value, dict)
    if isinstance(spec, schema.ListOf):
        return isinstance(value, list)
    return False


def _type_name(spec):
    names = {
        schema.Number: "a number",
        schema.Integer: "an integer",
        str: "a string",
        bool: "true/false",
        type(None): "null",
        float: "a number",
        int: "an integer",
    }
    if spec in names:
        return names[spec]
    if isinstance(spec, schema.ListOf):
        return f"a list of {_type_name(spec.item).removeprefix('a ').removeprefix('an ')}s"
    if isinstance(spec, (schema.Section, schema.Typed)):
        return "an object"
    if isinstance(spec, schema.OneOf):
        return " or ".join(_type_name(o) for o in spec.options)
    return str(spec)


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _describe(value):
    text = json.dumps(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_json_type(value)} {text}"


def _show(path):
    """Paths relative to the working directory when that is shorter, for readable errors."""
    if path == CFG_OPTIONS or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path)
    return rel if not rel.startswith("../..") else path


def redact(recipe):
    """A copy safe to print or save: secrets (the hub token) removed."""
    clean = copy.deepcopy(recipe)
    args = clean.get("training_args")
    if isinstance(args, dict):
        args.pop("hub_token", None)
    return clean
