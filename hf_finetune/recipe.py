"""JSON recipes: `_base_` inheritance, mmengine merge rules, `--cfg-options`, validation.

A recipe is a JSON object mirroring an mmcls config. Merge rules (mmengine's):
  * `_base_` is a path or a list of paths, relative to the file that names them, loaded
    recursively; two bases of one file may not define the same top-level key;
  * a child dict merges into the base dict key by key, any other value (lists included)
    replaces the base value whole, and `"_delete_": true` in a child dict replaces the base
    dict instead of merging;
  * `--cfg-options a.b.c=VALUE` applies after merging; VALUE is JSON when it parses, else a
    string; a list index may appear in the path (`pipeline.0.padding=2`).

The result is the merged dict and where each key came from; config.py turns it into the typed
Config. Every error names the file (or `--cfg-options`) and the dotted key.
"""

import copy
import difflib
import json
import numbers
import os

from .errors import RecipeError

CFG_OPTIONS = "--cfg-options"


MAX_DEPTH = 32  # real recipes nest 8 deep at most; deeper input is a mistake or an attack
MAX_BYTES = 1 << 20  # the largest real recipe is a few KB


def load_recipe(path, cfg_options=None):
    """Load and merge a recipe file; `cfg_options` is a list of "key=value".
    Returns (recipe dict, {key path: file that set it})."""
    origins = {}
    recipe = _load_with_bases(os.path.abspath(path), stack=[], origins=origins)
    for option in cfg_options or []:
        _apply_option(recipe, option, origins)
    return recipe, origins


def check_size(data, where, depth=0):
    """Refuse recipes nested deeper than MAX_DEPTH before anything recurses into them."""
    if depth > MAX_DEPTH:
        raise RecipeError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    children = data.values() if isinstance(data, dict) else data if isinstance(data, list) else ()
    for child in children:
        check_size(child, where, depth + 1)


# --- loading and merging --------------------------------------------------------------------


def _read_json(path, included_from):
    if not os.path.isfile(path):
        where = f" (listed in _base_ of {show_path(included_from)})" if included_from else ""
        raise RecipeError(f"{show_path(path)}: recipe file not found{where}")
    try:
        if os.path.getsize(path) > MAX_BYTES:
            raise RecipeError(f"{show_path(path)}: {os.path.getsize(path)} bytes; a recipe is at most "
                              f"{MAX_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RecipeError(f"{show_path(path)}: cannot read recipe: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{show_path(path)}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(
            f"{show_path(path)}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}"
        ) from None
    except RecursionError:
        raise RecipeError(f"{show_path(path)}: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{show_path(path)}: a recipe must be a JSON object, got {json_type(data)}")
    check_size(data, show_path(path))
    return data


def _load_with_bases(path, stack, origins):
    if path in stack:
        chain = " -> ".join(show_path(p) for p in stack + [path])
        raise RecipeError(f"{show_path(path)}: _base_ cycle: {chain}")
    data = _read_json(path, stack[-1] if stack else None)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{show_path(path)}: _base_ must be a path or a list of paths")

    merged, owner = {}, {}
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        base_data = _load_with_bases(base_path, stack + [path], origins)
        for key in base_data:
            if key in merged:
                raise RecipeError(
                    f"{show_path(path)}: key '{key}' is defined by two of its bases, "
                    f"{show_path(owner[key])} and {show_path(base_path)}; a key may come from one base only"
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
            f"{CFG_OPTIONS}: {excerpt(option)} is not KEY=VALUE (example: "
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
                origins[tuple(walked) + (part,)] = CFG_OPTIONS
        else:
            raise RecipeError(
                f"{CFG_OPTIONS}: {excerpt(key)}: {where} is {json_type(node)} {excerpt(node)}, it has "
                f"no key {excerpt(part)}"
            )
        walked.append(str(part))
        if last:
            try:
                value = parse_value(raw)
            except RecursionError:
                raise RecipeError(f"{CFG_OPTIONS}: {excerpt(key)}: nested deeper than {MAX_DEPTH} "
                                  "levels") from None
            check_size(value, f"{CFG_OPTIONS} {key}")
            node[part] = value
            _mark_option(tuple(walked), node[part], origins)
        else:
            node = node[part]


def _mark_option(path, value, origins):
    origins[path] = CFG_OPTIONS
    if isinstance(value, dict):
        _record_origins(value, CFG_OPTIONS, path, origins)


# --- small helpers -------------------------------------------------------------------------


def json_type(value):
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


def show_path(path):
    """Paths relative to the working directory when that is shorter, for readable errors."""
    if path == CFG_OPTIONS or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path)
    return rel if not rel.startswith("../..") else path



def did_you_mean(name, options):
    """' (did you mean 'X'?)' naming the option closest to a misspelt name, or ''."""
    name, options = str(name), [str(o) for o in options]
    if len(name) > 200:  # no key is that long, and difflib takes minutes on megabytes
        return ""
    close = difflib.get_close_matches(name, options, n=1)
    if not close:  # "probability" -> "prob": a shared prefix is a good hint too
        close = [o for o in options if len(o) >= 3 and (name.startswith(o) or o.startswith(name))][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_number(value):
    """A JSON number (true/false are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value):
    """A JSON integer (true/false are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def excerpt(value, limit=60):
    """A short quote of a value for an error message (values can be megabytes)."""
    text = value if isinstance(value, str) else json.dumps(value)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= limit else text[:limit - 3] + "..."
