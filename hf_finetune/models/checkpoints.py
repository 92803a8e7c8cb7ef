"""Pretrained weights: fetch (URL / local path / Hub id), read safely, detect the layout,
remap onto our module names, load, and report what happened.

Layouts understood (after the optional mmengine-style `prefix` selection):
  mmcls/mmpretrain  backbone.conv1, backbone.bn1, backbone.layerI.J.{convK,bnK,downsample.0/1}, head.fc
  torchvision/timm  conv1, bn1, layerI.J.{convK,bnK,downsample.0/1}, fc
  transformers      ResNetForImageClassification: resnet.embedder/encoder..., classifier.1
                    ResNetModel: embedder.embedder..., encoder.stages...
  hf_finetune       backbone.embedder/encoder..., head.fc (our own save_pretrained)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import socket
import sys
import urllib.error
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_finetune.devices import process_rank
from hf_finetune.errors import CheckpointError

from .configuration_finetune_resnet import RESNET_ARCH

# Short, so an unreachable host fails in seconds rather than hanging the launch.
DOWNLOAD_TIMEOUT_S = 20.0
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".ckpt", ".pkl")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_MAX_LISTED = 8

LAYOUT_OURS = "hf_finetune"
LAYOUT_MMCLS = "mmcls/mmpretrain"
LAYOUT_TORCHVISION = "torchvision/timm"
LAYOUT_TIMM = "timm"
LAYOUT_HF_CLASSIFIER = "transformers ResNetForImageClassification"
LAYOUT_HF_MODEL = "transformers ResNetModel"


def _is_main_process() -> bool:
    return process_rank() == 0


def _listing(items, limit=_MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------- fetching
@dataclass
class CheckpointFile:
    """A checkpoint resolved to a local file, with what its origin tells about its layout."""

    source: str
    path: Path
    layout_hint: str | None = None


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def is_hub_id(value) -> bool:
    """A Hub repository id ('org/name', by the Hub's own rules), as opposed to a URL or a local file."""
    if not isinstance(value, str) or value.count("/") != 1 or value.lower().endswith(CHECKPOINT_SUFFIXES):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return not os.path.exists(value)


def _download_url(url: str, *, key: str) -> Path:
    """`url` through torch.hub's cache (`$TORCH_HOME/hub/checkpoints`), downloaded once.

    torch.hub.load_state_dict_from_url would also torch.load the file, which our safe reader must
    do instead, so this is its download half: a hash prefix in the file name (mmcls:
    `..._20210831-ea4938fc.pth`) is checked against the SHA-256 of the download.
    """
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    if not filename:
        raise CheckpointError(f"{key}: URL {url} does not name a file")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached
    manual = (
        f"Download it on a machine with access (e.g. `wget {url}`), copy it here and set {key} "
        "to the local path."
    )
    if is_offline_mode():
        raise CheckpointError(
            f"{key}: {url} is not in the torch.hub cache ({cached}) and offline mode is on (HF_HUB_OFFLINE). {manual}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(filename)
    hash_prefix = match.group(1) if match and match.group(1) else None
    # torch.hub's urlopen takes no timeout; the default one applies to the sockets it opens.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(cached), hash_prefix, progress=_is_main_process())
    except urllib.error.HTTPError as exc:
        raise CheckpointError(f"{key}: downloading {url} failed: HTTP {exc.code} {exc.reason}. {manual}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CheckpointError(f"{key}: cannot download {url} ({reason}). {manual}") from None
    except RuntimeError as exc:
        if "invalid hash value" not in str(exc):
            raise
        raise CheckpointError(
            f"{key}: the file downloaded from {url} does not match the hash prefix '{hash_prefix}' in its "
            f"name ({exc}); it is corrupt or not the published file, so it was not cached."
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return cached


def _hub_hint(config_path) -> str | None:
    """timm repositories carry a config.json with "architecture"; transformers ones a "model_type"."""
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError, TypeError):
        return None
    if isinstance(config, dict) and "architecture" in config and "model_type" not in config:
        return LAYOUT_TIMM
    return None


def download_from_hub(repo_id: str, *, key: str = "checkpoint") -> CheckpointFile:
    """model.safetensors (or pytorch_model.bin) of a Hub repository, through huggingface_hub's cache."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from hf_finetune.data.sources import hub_reachable

    # hf_hub_download reads only the cache in offline mode. It retries an endpoint that does not
    # answer for ~20 s, so the Hub is probed once first (as for datasets) and the cache read instead.
    cache_only = None
    if is_offline_mode():
        cache_only = "offline mode is on (HF_HUB_OFFLINE; unset it to download)"
    elif not hub_reachable():
        cache_only = f"the Hub ({constants.ENDPOINT}) cannot be reached (check the network / HF_ENDPOINT)"
    for filename in WEIGHT_FILES:
        try:
            path = hf_hub_download(repo_id, filename, local_files_only=cache_only is not None)
        except LocalEntryNotFoundError:
            if cache_only:
                continue  # the other weight file may be cached
            cache_only = "the Hub cannot be reached (check the network / HF_ENDPOINT)"
            break
        except EntryNotFoundError:
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise CheckpointError(
                f"{key}: '{repo_id}' is neither an existing local path nor a Hub repository you can access "
                f"({type(exc).__name__})."
            ) from None
        except (OSError, ConnectionError) as exc:
            raise CheckpointError(f"{key}: cannot fetch '{repo_id}' from the Hub: {exc}") from None
        hint = None
        with contextlib.suppress(Exception):
            hint = _hub_hint(hf_hub_download(repo_id, "config.json", local_files_only=True))
        return CheckpointFile(repo_id, Path(path), hint)
    if cache_only:
        raise CheckpointError(
            f"{key}: '{repo_id}' is not a local path, {cache_only}, and the Hub cache "
            f"({constants.HF_HUB_CACHE}) has no {' or '.join(WEIGHT_FILES)} for it. Download the weights on a "
            f"machine with access and set {key} to their local path."
        )
    raise CheckpointError(f"{key}: Hub repository '{repo_id}' has no {' or '.join(WEIGHT_FILES)}")


def weights_file(folder) -> Path | None:
    """The weights save_pretrained wrote in `folder` (safetensors first), None when it has none."""
    return next((Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).is_file()), None)


def resolve_checkpoint(source: str, *, key: str = "checkpoint") -> CheckpointFile:
    """URL -> torch.hub cache; existing path -> itself; `owner/name` -> Hub; else CheckpointError."""
    source = str(source)
    if _is_url(source):
        return CheckpointFile(source, _download_url(source, key=key))
    path = Path(source).expanduser()
    if path.is_dir():
        weights = weights_file(path)
        if weights is None:
            raise CheckpointError(
                f"{key}: directory {source} holds no {' or '.join(WEIGHT_FILES)} "
                f"(found: {_listing(sorted(p.name for p in path.iterdir())) or 'nothing'})"
            )
        return CheckpointFile(source, weights, _hub_hint(path / "config.json"))
    if path.is_file():
        return CheckpointFile(source, path, _hub_hint(path.parent / "config.json"))
    if is_hub_id(source):
        return download_from_hub(source, key=key)
    raise CheckpointError(f"{key}: checkpoint file not found: {source}")


# --------------------------------------------------------------------------- reading
class UnloadedObject:
    """Inert stand-in for a class or function named in a pickle that we refuse to import.

    It records the constructor arguments and state it is given and does nothing else, so the
    tensors around it (rebuilt by torch's own allowlisted functions) load without running code
    from the checkpoint's libraries (mmengine MessageHub, optimizers, schedulers, numpy...).
    """

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<not loaded: {self.pickled_name}>"


def _placeholder(full_name: str):
    module, _, name = full_name.rpartition(".")
    cls = type(name, (UnloadedObject,), {"__module__": module or "builtins", "pickled_name": full_name})
    # The (object, "module.name") form allowlists it under the exact name the pickle uses.
    return (cls, full_name)


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_BLOCKED_GLOBAL = re.compile(r"GLOBAL (\S+) whose module \S+ is blocked")


def read_checkpoint(path, *, key: str = "checkpoint", foreign_classes: bool = False) -> object:
    """Read a .safetensors or torch.save file without running code from it.

    torch.load(weights_only=True); a class it blocks (os.system, ...) refuses the file. Any other
    class outside torch's allowlist:
      foreign_classes=False  what --resume and --eval-only read: numpy arrays pass, as in the
                             Trainer's own loads; anything else refuses the file, as they would.
      foreign_classes=True   pretrained weights: an inert UnloadedObject stands in for it, so an
                             mmpretrain epoch_N.pth (mmengine MessageHub, numpy, ...) loads.
    Every failure is one CheckpointError line starting with `key` and naming the file.
    """
    from transformers.trainer_pt_utils import safe_globals

    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, key)
    names: set[str] = set()  # the classes that get a stand-in
    if foreign_classes:  # listed up front for zip files; a legacy file's are found one load at a time
        with contextlib.suppress(Exception):
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    # numpy's allowlist only without stand-ins: an allowed array whose dtype class stands in cannot be built.
    allowlist = contextlib.nullcontext if foreign_classes else safe_globals
    while True:
        try:
            with allowlist(), torch.serialization.safe_globals([_placeholder(n) for n in sorted(names)]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            blocked, unknown = _BLOCKED_GLOBAL.search(str(exc)), _UNSUPPORTED_GLOBAL.search(str(exc))
            if blocked or (unknown and (not foreign_classes or unknown.group(1) in names)):
                name = (blocked or unknown).group(1)
                raise CheckpointError(
                    f"{key}: {path} refuses to load: it calls {name}, which a checkpoint never needs "
                    "(it may be malicious)"
                ) from None
            if unknown:
                names.add(unknown.group(1))
                continue
            error = exc
        except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is not a torch checkpoint
            error = exc
        break
    with contextlib.suppress(CheckpointError):  # safetensors under another name
        return _read_safetensors(path, key)
    raise CheckpointError(
        f"{key}: {path} is not a checkpoint (neither a torch.save file nor safetensors; {_detail(error)})"
    )


def _detail(error: Exception) -> str:
    """The informative line of an error (torch's weights-only errors wrap it in advice we must not follow)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _read_safetensors(path: Path, key: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not safetensors"
        raise CheckpointError(f"{key}: {path} is not a readable safetensors file: {exc}") from None


def assert_finite(tensors: dict, source: str, *, key: str = "checkpoint") -> None:
    """Refuse NaN / inf in any floating tensor of `tensors` (name -> tensor), naming them."""
    floats = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    # Norms in one fused pass (as clip_grad_norm_ does): a norm is finite unless a value is not, or
    # its squares overflow; only those tensors get the exact, much slower check.
    norms = torch._foreach_norm(list(floats.values())) if floats else []
    suspects = [name for name, norm in zip(floats, norms) if not torch.isfinite(norm)]
    bad = [name for name in suspects if not torch.isfinite(floats[name]).all()]
    if bad:
        raise CheckpointError(
            f"{key}: {source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {_listing(bad)}; "
            "it comes from a diverged run or is corrupt"
        )


def verify_weights(folder, *, key: str = "checkpoint") -> None:
    """Read the weights saved in `folder` without running code from them, and check they are finite.

    Raises CheckpointError with one line; call it before `from_pretrained(folder)`.
    """
    weights = weights_file(folder)
    if weights is None:
        raise CheckpointError(f"{key}: {folder} has no {' or '.join(WEIGHT_FILES)}")
    assert_finite(read_checkpoint(weights, key=key), str(weights), key=key)


def load_checkpoint_file(source: str, *, key: str = "checkpoint") -> object:
    """Fetch `source` (http(s) URL, local path, or Hub repo id) and read it safely."""
    return read_checkpoint(resolve_checkpoint(source, key=key).path, key=key, foreign_classes=True)


# --------------------------------------------------------------------------- layouts
def extract_state_dict(obj) -> tuple[dict, str | None]:
    """The tensor dict inside a checkpoint, and a layout hint from its container."""
    hint = None
    if isinstance(obj, dict):
        if "meta" in obj or "message_hub" in obj:
            hint = LAYOUT_MMCLS
        elif "arch" in obj:  # timm's training checkpoints: {'arch', 'state_dict', 'optimizer', ...}
            hint = LAYOUT_TIMM
        for container in ("state_dict", "model", "module"):
            inner = obj.get(container)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    state_dict = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(f"the checkpoint holds no tensors (top-level keys: {_listing(obj)})")
    # DataParallel / DDP wrappers (mmengine strips it the same way).
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict, hint


def top_level_prefixes(state_dict) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in state_dict})


def select_prefix(state_dict: dict, prefix: str) -> dict:
    """mmengine's `_load_checkpoint_with_prefix`: keep keys under `prefix.` with it stripped."""
    prefix = prefix if prefix.endswith(".") else prefix + "."
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointError(
            f"prefix '{prefix[:-1]}' matches no key in the checkpoint; its top-level prefixes are: "
            f"{_listing(top_level_prefixes(state_dict), 20)}"
        )
    return selected


_TV_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_TV_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv|bn)(\d+)\.(\w+)$")
_TV_DOWNSAMPLE = re.compile(r"^layer(\d+)\.(\d+)\.downsample\.([01])\.(\w+)$")


def _torchvision_key(key: str) -> str | None:
    """torchvision / timm / mmcls-backbone key -> our key (`backbone.` / `head.fc.` prefixed)."""
    if m := _TV_STEM.match(key):
        part = "convolution" if m.group(1) == "conv1" else "normalization"
        return f"backbone.embedder.embedder.{part}.{m.group(2)}"
    if m := _TV_BLOCK.match(key):
        stage, block, kind, index, name = m.groups()
        part = "convolution" if kind == "conv" else "normalization"
        return f"backbone.encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(index) - 1}.{part}.{name}"
    if m := _TV_DOWNSAMPLE.match(key):
        stage, block, index, name = m.groups()
        part = "convolution" if index == "0" else "normalization"
        return f"backbone.encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{part}.{name}"
    if key in ("fc.weight", "fc.bias"):
        return "head." + key
    return None


def _mmcls_key(key: str) -> str | None:
    if key.startswith("backbone."):
        mapped = _torchvision_key(key[len("backbone."):])
        return mapped if mapped and mapped.startswith("backbone.") else None
    if key in ("head.fc.weight", "head.fc.bias"):
        return key
    return None


def _hf_classifier_key(key: str) -> str | None:
    if key.startswith(("resnet.embedder.", "resnet.encoder.")):
        return "backbone." + key[len("resnet."):]
    if key in ("classifier.1.weight", "classifier.1.bias"):
        return "head.fc." + key.rsplit(".", 1)[1]
    return None


def _hf_model_key(key: str) -> str | None:
    return "backbone." + key if key.startswith(("embedder.", "encoder.")) else None


def _ours_key(key: str) -> str | None:
    if key.startswith(("backbone.embedder.", "backbone.encoder.")) or key in ("head.fc.weight", "head.fc.bias"):
        return key
    return None


# layout -> (key mapper, recogniser of its backbone keys)
_SCHEMES = {
    LAYOUT_OURS: (_ours_key, lambda k: k.startswith(("backbone.embedder.", "backbone.encoder."))),
    LAYOUT_MMCLS: (_mmcls_key, lambda k: re.match(r"^backbone\.(conv1|bn1|layer\d)", k) is not None),
    LAYOUT_TORCHVISION: (_torchvision_key, lambda k: re.match(r"^(conv1|bn1|layer\d)", k) is not None),
    LAYOUT_HF_CLASSIFIER: (_hf_classifier_key, lambda k: k.startswith(("resnet.embedder.", "resnet.encoder."))),
    LAYOUT_HF_MODEL: (_hf_model_key, lambda k: k.startswith(("embedder.", "encoder."))),
}


def detect_layout(state_dict: dict) -> str:
    """The key layout whose backbone names match the most keys."""
    counts = {layout: sum(map(recognise, state_dict)) for layout, (_, recognise) in _SCHEMES.items()}
    layout, count = max(counts.items(), key=lambda item: item[1])
    if count == 0:
        raise CheckpointError(
            "no ResNet weights recognised in the checkpoint (expected mmcls, torchvision, timm or "
            f"transformers key names); its top-level prefixes are: {_listing(top_level_prefixes(state_dict), 20)}"
        )
    return layout


def remap_state_dict(state_dict: dict, layout: str) -> tuple[dict, list[str]]:
    """Rename a checkpoint's keys onto ours. Returns (our key -> tensor, keys with no counterpart)."""
    mapper, _ = _SCHEMES[layout]
    mapped, unmapped = {}, []
    for key, tensor in state_dict.items():
        ours = mapper(key)
        if ours is None:
            unmapped.append(key)
        else:
            mapped[ours] = tensor
    return mapped, unmapped


def to_transformers_state_dict(state_dict: dict) -> dict:
    """Our state dict -> transformers ResNetForImageClassification keys (the native export)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith("backbone."):
            out["resnet." + key[len("backbone."):]] = tensor
        elif key.startswith("head.fc."):
            out["classifier.1." + key[len("head.fc."):]] = tensor
    return out


def _prefix_advice(layout: str) -> str:
    advice = {
        LAYOUT_MMCLS: "; use prefix 'backbone'",
        LAYOUT_OURS: "; use prefix 'backbone' or none",
        LAYOUT_HF_CLASSIFIER: "; use prefix 'resnet' or none",
        LAYOUT_TORCHVISION: "; use no prefix",
        LAYOUT_HF_MODEL: "; use no prefix",
    }
    return advice.get(layout, "")


def _guess_depth(mapped: dict) -> int | None:
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in mapped:
        if m := re.match(r"^backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.", key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck |= m.group(3) == "2"
    arch = ("bottleneck" if bottleneck else "basic", tuple(len(blocks.get(i, ())) for i in range(4)))
    return next((depth for depth, spec in RESNET_ARCH.items() if spec == arch), None)


# --------------------------------------------------------------------------- loading + report
@dataclass
class LoadReport:
    """What a checkpoint load did. `text()` is the readable report."""

    source: str
    layout: str
    scope: str  # "backbone" (init_cfg) or "model" (load_from)
    prefix: str | None = None
    backbone_total: int = 0
    backbone_loaded: int = 0
    head_loaded: bool = False
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.backbone_loaded == self.backbone_total

    def text(self) -> str:
        origin = self.layout + (f", prefix '{self.prefix}'" if self.prefix else "")
        head = " and the head" if self.head_loaded else ""
        count = f"{self.backbone_loaded}/{self.backbone_total}"
        lines = [f"loaded {count} backbone tensors{head} from {self.source} ({origin})"]
        if self.missing:
            lines.append(f"  missing in the checkpoint ({len(self.missing)}): {_listing(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected, not used ({len(self.unexpected)}): {_listing(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            lines.append(f"  shape mismatch, not loaded ({len(shown)}): {_listing(shown)}")
        lines.extend("  " + note for note in self.notes)
        return "\n".join(lines)


def load_pretrained(
    model,
    source: str,
    *,
    prefix: str | None = None,
    scope: str = "backbone",
    allow_partial: bool = False,
    key: str = "model.backbone.init_cfg.checkpoint",
    verbose: bool = True,
) -> LoadReport:
    """Load `source` into `model` (backbone only, or the whole model with scope="model").

    Raises CheckpointError when fewer than all backbone tensors load, unless `allow_partial`.
    """
    if scope not in ("backbone", "model"):
        raise ValueError(f"scope must be 'backbone' or 'model', got {scope!r}")
    resolved = resolve_checkpoint(source, key=key)
    checkpoint = read_checkpoint(resolved.path, key=key, foreign_classes=True)
    try:
        state_dict, container_hint = extract_state_dict(checkpoint)
        full_layout = None
        with contextlib.suppress(CheckpointError):
            full_layout = detect_layout(state_dict)
        if prefix:
            try:
                state_dict = select_prefix(state_dict, prefix)
            except CheckpointError as exc:
                what = ""
                if full_layout:
                    what = f" (it looks like a {full_layout} checkpoint{_prefix_advice(full_layout)})"
                raise CheckpointError(f"{exc}{what}") from None
        layout = detect_layout(state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f"{key}: {source}: {exc}") from None
    assert_finite(state_dict, str(source), key=key)

    mapped, unexpected = remap_state_dict(state_dict, layout)
    # Name the layout by where the file came from: after prefix='backbone' an mmcls file has torchvision-like keys.
    if layout == LAYOUT_TORCHVISION:
        label = resolved.layout_hint or container_hint or full_layout or layout
    else:
        label = full_layout or layout
    report = LoadReport(source=str(source), layout=label, scope=scope, prefix=prefix, unexpected=unexpected)

    model_state = model.state_dict()
    counted = [k for k in model_state if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    num_classes = model_state["head.fc.weight"].shape[0]
    to_load, head_in_checkpoint = {}, {}
    for our_key, tensor in mapped.items():
        if our_key not in model_state:
            report.unexpected.append(our_key)
        elif our_key.startswith("head."):
            head_in_checkpoint[our_key] = tensor
        elif tuple(tensor.shape) != tuple(model_state[our_key].shape):
            report.mismatched.append((our_key, tuple(tensor.shape), tuple(model_state[our_key].shape)))
        else:
            to_load[our_key] = tensor

    if head_in_checkpoint:
        ckpt_classes = head_in_checkpoint.get("head.fc.weight", next(iter(head_in_checkpoint.values()))).shape[0]
        shapes_match = all(tuple(t.shape) == tuple(model_state[k].shape) for k, t in head_in_checkpoint.items())
        if scope == "backbone":
            report.notes.append(
                f"head: the checkpoint's {ckpt_classes}-class head is not used (expected: init_cfg initialises "
                f"the backbone only; the model's {num_classes}-class head is new)"
            )
        elif shapes_match:
            to_load.update(head_in_checkpoint)
            report.head_loaded = True
        else:
            report.notes.append(
                f"head: the checkpoint's head has {ckpt_classes} classes, the model {num_classes}: not loaded "
                "(expected when fine-tuning to a new label set; the head is new)"
            )
    elif scope == "model":
        report.notes.append("head: not in the checkpoint; the head is new")

    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)

    report.backbone_total = len(counted)
    report.backbone_loaded = sum(1 for k in counted if k in to_load)
    mismatched_keys = {k for k, _, _ in report.mismatched}
    report.missing = [k for k in counted if k not in to_load and k not in mismatched_keys]

    if not report.complete:
        depth = _guess_depth(mapped)
        if depth is not None and depth != model.config.depth:
            report.notes.append(
                f"the checkpoint looks like a ResNet-{depth} but the model is a ResNet-{model.config.depth}: "
                f"set model.backbone.depth={depth}"
            )
    if not report.complete and not allow_partial:
        hint = (
            "set model.backbone.init_cfg.allow_partial=true to accept a partial load"
            if scope == "backbone"
            else "check that the checkpoint matches the model"
        )
        raise CheckpointError(f"{key}: incomplete load, {hint}:\n{report.text()}")
    if verbose and _is_main_process():
        print(report.text(), file=sys.stderr, flush=True)
    return report


__all__ = [
    "WEIGHT_FILES",
    "CheckpointFile",
    "LoadReport",
    "UnloadedObject",
    "assert_finite",
    "detect_layout",
    "download_from_hub",
    "extract_state_dict",
    "is_hub_id",
    "load_checkpoint_file",
    "load_pretrained",
    "read_checkpoint",
    "remap_state_dict",
    "resolve_checkpoint",
    "select_prefix",
    "to_transformers_state_dict",
    "top_level_prefixes",
    "verify_weights",
    "weights_file",
]
