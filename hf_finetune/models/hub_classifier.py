"""Hub image classifiers: mmpretrain's HuggingFaceClassifier and TimmClassifier.

The model is transformers' own: `AutoModelForImageClassification` builds any image
classifier of the Hub (timm's through its `TimmWrapper` model type), the head resized to the
dataset's classes. What this module adds is only what transformers has no notion of:

* input preparation: our data pipeline hands uint8 [N, 3, H, W] batches to the model; a
  forward pre-hook registered at build (and at load) converts them on the device with the
  data_preprocessor mean / std (the ResNet's `normalize` math), and asks ViT-like models to
  interpolate their position embeddings when the input size is not theirs;
* the recipe's loss (`classification_loss`, shared with the ResNet): the Trainer computes it
  from the logits, so label smoothing, Focal / Asymmetric and Mixup / CutMix soft targets
  work as for the ResNet;
* mmpretrain's fine-tuning knobs per family (`FAMILIES`): frozen_stages, norm_eval and the
  layer ids of layer-wise LR decay.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import types

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

from hf_finetune.errors import CheckpointError, RecipeError

from .modeling_finetune_resnet import classification_loss


@dataclasses.dataclass(frozen=True)
class Family:
    embeddings: str  # module path of the embeddings (layer 0)
    blocks: str  # module path of the ModuleList whose items are layers 1..N
    unit: str  # what N of frozen_stages counts, for the docs and messages


# What `frozen_stages` and layer-wise LR decay mean per model family (config.model_type), as
# mmpretrain defines them for its own backbones. Layer 0 is the embeddings (patch / stem
# convolution, class token, position embeddings), layers 1..N the stages or blocks listed,
# layer N+1 everything after them (final norm, pooler, classifier head).
#   frozen_stages: -1 nothing; 0 the embeddings; k the embeddings and layers 1..k.
#   layer_decay_rate r: a parameter of layer i trains at lr * r ** (N + 1 - i); the head at lr.
#   (ViT-like families match mmpretrain's layer ids; for ConvNeXt it is one layer per stage,
#   where mmpretrain's ConvNeXt splits stage 3 into groups of 3 blocks.)
# timm models (TimmClassifier) take their layers from timm's own `group_matcher(coarse=False)`,
# as timm's `param_groups_layer_decay` does: group 0 is the stem, then each block, the head last.
# A family not listed here (EfficientNet, MobileNet, ...) refuses frozen_stages >= 0 and
# layer-wise LR decay in one line.
FAMILIES = {
    "vit": Family("vit.embeddings", "vit.layers", "encoder layers"),
    "deit": Family("deit.embeddings", "deit.layers", "encoder layers"),
    "beit": Family("beit.embeddings", "beit.layers", "encoder layers"),
    "dinov2": Family("dinov2.embeddings", "dinov2.encoder.layer", "encoder layers"),
    "convnext": Family("convnext.embeddings", "convnext.encoder.stages", "stages"),
    "convnextv2": Family("convnextv2.embeddings", "convnextv2.encoder.stages", "stages"),
    "swin": Family("swin.embeddings", "swin.encoder.layers", "stages"),
    "regnet": Family("regnet.embedder", "regnet.encoder.stages", "stages"),
    "resnet": Family("resnet.embedder", "resnet.encoder.stages", "stages"),
}
TIMM_TYPE = "timm_wrapper"
TIMM_INSTALL = 'pip install "hf_finetune[timm]"'


# ----------------------------------------------------------------------------- sources
def model_source(model_cfg) -> str:
    """The id or folder to load: TimmClassifier's bare timm names live under timm/ on the Hub."""
    name = model_cfg.model_name
    if model_cfg.type == "TimmClassifier" and "/" not in name and not os.path.exists(name):
        return "timm/" + name
    return name


def _load_kwargs(model_cfg) -> dict:
    """from_pretrained arguments: revision, trust_remote_code, and the Hub cache only when
    offline or the Hub does not answer (transformers would retry for minutes)."""
    kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    if not os.path.isdir(model_source(model_cfg)) and _offline_reason() is not None:
        kwargs["local_files_only"] = True
    return kwargs


def _offline_reason():
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    if not _reachable(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT):
        return f"the Hub ({constants.ENDPOINT}) cannot be reached"
    return None


@functools.lru_cache(maxsize=4)
def _reachable(endpoint):
    """One probe per endpoint and process: a model is looked up several times per run."""
    from hf_finetune.data.sources import hub_reachable

    return hub_reachable()


def _source_error(model_cfg, exc) -> RecipeError:
    """One line for a model_name that does not load: which key, why, what is accepted."""
    name = model_source(model_cfg)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    key = f"model.model_name {model_cfg.model_name!r}"
    if "trust_remote_code" in str(exc) or "custom code" in str(exc):
        return RecipeError(f"{key}: its code lives in the model repo and would run here; set "
                           f"model.trust_remote_code=true if you trust it, or choose a model transformers "
                           f"implements")
    if os.path.isfile(name):
        return RecipeError(f"{key}: a file; expected a Hub model id or a folder saved with save_pretrained")
    if not os.path.isdir(name) and (name.startswith((".", os.sep, "~")) or name.count("/") > 1):
        return RecipeError(f"{key}: no such folder; expected a Hub model id (org/name) or a folder saved "
                           f"with save_pretrained")
    if os.path.isdir(name):
        return RecipeError(f"{key}: not a saved transformers model ({text}); expected a folder with "
                           f"config.json and weights, as save_pretrained writes")
    offline = _offline_reason()
    if offline:
        return RecipeError(f"{key}: not a local folder, {offline}, and the Hub cache has no copy of it; "
                           f"download it on a machine with access, or set model.model_name to a local folder")
    return RecipeError(f"{key}: not a Hub model you can access ({text}); expected a Hub model id such as "
                       f"google/vit-base-patch16-224 or a local folder")


def load_model_config(model_cfg):
    """The model's transformers config, checked against the recipe's model type."""
    from transformers import AutoConfig

    if model_cfg.type == "TimmClassifier":
        _require_timm()
    if model_cfg.revision is not None and os.path.isdir(model_source(model_cfg)):
        raise RecipeError(f"model.revision: model.model_name {model_cfg.model_name!r} is a local folder, which has "
                          f"no revisions; remove it (or name the Hub id)")
    try:
        config = AutoConfig.from_pretrained(model_source(model_cfg), **_load_kwargs(model_cfg))
    except (OSError, ValueError, KeyError) as exc:
        raise _source_error(model_cfg, exc) from None
    key = f"model.model_name {model_cfg.model_name!r}"
    if model_cfg.type == "TimmClassifier" and config.model_type != TIMM_TYPE:
        raise RecipeError(f"{key}: a {config.model_type!r} model, not a timm one; use model.type "
                          f"HuggingFaceClassifier, or a timm model (timm/<name>)")
    if model_cfg.type == "HuggingFaceClassifier" and config.model_type == TIMM_TYPE:
        raise RecipeError(f"{key}: a timm model; use model.type TimmClassifier")
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING and \
            "AutoModelForImageClassification" not in (getattr(config, "auto_map", None) or {}):
        raise RecipeError(f"{key}: a {config.model_type!r} model, not an image classifier "
                          f"(AutoModelForImageClassification has no class for it); expected an "
                          f"image-classification model such as google/vit-base-patch16-224")
    return config


def _require_timm():
    from transformers.utils import is_timm_available

    if not is_timm_available():
        raise RecipeError(f"model.type TimmClassifier needs timm, which is not installed: {TIMM_INSTALL}")


# ----------------------------------------------------------------------------- preprocessing
def image_processor(model_cfg):
    """The model's image processor (AutoImageProcessor; timm's TimmWrapperImageProcessor for
    timm models), or None when the model has none."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_source(model_cfg), **_load_kwargs(model_cfg))
    except (OSError, ValueError, KeyError):
        return None


def processor_statistics(processor):
    """(mean, std) on the 0-255 scale that give the processor's normalisation of uint8 input."""
    data_config = getattr(processor, "data_config", None)  # timm: pretrained_cfg, on the 0-1 scale
    if data_config is not None:
        return [m * 255 for m in data_config["mean"]], [s * 255 for s in data_config["std"]]
    scale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
    if not getattr(processor, "do_normalize", True) or processor.image_mean is None:
        return [0.0, 0.0, 0.0], [1 / scale] * 3
    mean, std = processor.image_mean, processor.image_std
    mean = list(mean) if isinstance(mean, (list, tuple)) else [mean] * 3
    std = list(std) if isinstance(std, (list, tuple)) else [std] * 3
    return [float(m) / scale for m in mean], [float(s) / scale for s in std]


def processor_size(processor):
    """(height, width) the processor hands the model, or None when it keeps the image's."""
    data_config = getattr(processor, "data_config", None)
    if data_config is not None:
        return tuple(data_config["input_size"][1:])
    if getattr(processor, "do_center_crop", False) and processor.crop_size:
        size = processor.crop_size
    else:
        size = getattr(processor, "size", None) or {}
    if "height" in size:
        return size["height"], size["width"]
    if "shortest_edge" in size and getattr(processor, "crop_pct", None):
        return size["shortest_edge"], size["shortest_edge"]  # ConvNeXt's: resize, then a square crop
    return None


def model_preprocessing(model_cfg, preprocessor_cfg):
    """(data_preprocessor with mean / std from the model's image processor where the recipe
    leaves them null (config: null means "the model's"), the processor's evaluation size
    (height, width) or None)."""
    load_model_config(model_cfg)  # a bad model_name says so before "no image processor"
    processor = image_processor(model_cfg)
    if processor is None:
        if preprocessor_cfg.mean is None or preprocessor_cfg.std is None:
            raise RecipeError(f"model.model_name {model_cfg.model_name!r} has no image processor "
                              f"(preprocessor_config.json) to take the normalisation from; set "
                              f"data_preprocessor.mean and data_preprocessor.std (0-255 scale)")
        return preprocessor_cfg, None
    mean, std = processor_statistics(processor)
    resolved = dataclasses.replace(preprocessor_cfg, mean=preprocessor_cfg.mean or mean,
                                   std=preprocessor_cfg.std or std)
    return resolved, processor_size(processor)


# ----------------------------------------------------------------------------- build
def build_hub_model(model_cfg, preprocessor_cfg, id2label):
    """AutoModelForImageClassification from model_cfg.model_name, the head resized to
    id2label, the knobs applied and the uint8 input preparation registered (mean / std null:
    the model's, see model_preprocessing)."""
    from transformers import AutoModelForImageClassification

    if preprocessor_cfg.mean is None or preprocessor_cfg.std is None:
        preprocessor_cfg = model_preprocessing(model_cfg, preprocessor_cfg)[0]

    config = load_model_config(model_cfg)
    config.num_labels = len(id2label)
    config.id2label = dict(id2label)
    config.label2id = {name: index for index, name in id2label.items()}
    config.problem_type = "multi_label_classification" if model_cfg.multi_label else "single_label_classification"
    # TimmWrapperConfig saves these in place of id2label when the loaded config had them.
    for attr, value in (("label_names", [id2label[i] for i in range(len(id2label))]), ("num_classes", len(id2label))):
        if hasattr(config, attr):
            setattr(config, attr, value)
    kwargs = _load_kwargs(model_cfg)
    try:
        if model_cfg.pretrained:
            # The head's shape differs from the checkpoint's: it starts fresh (and is reported).
            model = AutoModelForImageClassification.from_pretrained(
                model_source(model_cfg), config=config, ignore_mismatched_sizes=True, **kwargs)
        else:
            model = AutoModelForImageClassification.from_config(
                config, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _source_error(model_cfg, exc) from None
    # frozen_stages: no gradient, and (prepare_inputs) eval mode while training, as mmpretrain's.
    frozen, frozen_modules = frozen_layers(model, model_cfg.frozen_stages, model_cfg.key("frozen_stages"))
    for name, param in model.named_parameters():
        if frozen(name):
            param.requires_grad_(False)
    if model_cfg.norm_eval and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise RecipeError(f"{model_cfg.key('norm_eval')}: {type(model).__name__} has no BatchNorm layer to keep in "
                          f"eval mode; remove it")
    if model_cfg.with_cp:
        enable_checkpointing(model, model_cfg.key("with_cp"))
    prepare_inputs(model, preprocessor_cfg.mean, preprocessor_cfg.std, preprocessor_cfg.to_rgb,
                   frozen=frozen_modules, norm_eval=model_cfg.norm_eval)
    return model


def enable_checkpointing(model, key):
    if not model.supports_gradient_checkpointing:
        raise RecipeError(f"{key}: {type(model).__name__} has no gradient checkpointing in transformers; "
                          f"set it to false")
    # Newer transformers name it activation_checkpointing_enable (the old name warns).
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()


def load_hub_folder(folder, key, mean=None, std=None, to_rgb=False):
    """A saved Hub classifier (work dir or checkpoint): plain AutoModelForImageClassification,
    never remote code, with the input preparation it was trained with. mean / std: the
    recipe's (resolved); None reads them from the folder's preprocessor_config.json."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{key}: cannot load the model saved there ({text})") from None
    if mean is None or std is None:
        try:
            mean, std = processor_statistics(AutoImageProcessor.from_pretrained(folder))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{key}: no preprocessor_config.json there to normalise the input with "
                                  f"({type(exc).__name__})") from None
    prepare_inputs(model, mean, std, to_rgb)
    return model.eval()


# ----------------------------------------------------------------------------- input preparation
def prepare_inputs(model, mean, std, to_rgb=False, frozen=(), norm_eval=False):
    """Register the forward pre-hook that readies a batch for the model, on its device:

    * uint8 pixel_values -> float, (x - mean) / std (mean / std on the 0-255 scale, as the
      ResNet's `normalize`); float input is taken as already normalised (an image processor's);
      to_rgb flips the channels first;
    * a size other than config.image_size: `interpolate_pos_encoding=True` where the model's
      forward has it (ViT, DeiT, BEiT, Swin ...);
    * in training mode, the frozen modules and (norm_eval) every BatchNorm back in eval mode:
      the Trainer calls model.train() before each step, and transformers models have no
      frozen_stages of their own to keep them there (the ResNet's train() does this).
    """
    stats = {}  # device -> (mean, std) tensors, made once per device
    interpolates = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    keep_eval = list(frozen) + ([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                                if norm_eval else [])

    def hook(module, args, kwargs):
        if module.training:
            for m in keep_eval:
                m.eval()
        pixel_values = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
        if to_rgb:
            pixel_values = pixel_values.flip(1)
        if pixel_values.dtype == torch.uint8:
            if pixel_values.device not in stats:
                stats[pixel_values.device] = tuple(torch.tensor(v, dtype=torch.float32, device=pixel_values.device)
                                                   .view(1, 3, 1, 1) for v in (mean, std))
            m, s = stats[pixel_values.device]
            # In the model's dtype, as the ResNet's normalize (a bf16 evaluation casts the model).
            pixel_values = ((pixel_values.float() - m) / s).to(module.dtype)
        if interpolates and tuple(pixel_values.shape[-2:]) != _image_size(module.config):
            kwargs = {**kwargs, "interpolate_pos_encoding": True}
        if "pixel_values" in kwargs:
            return args, {**kwargs, "pixel_values": pixel_values}
        return (pixel_values,) + tuple(args[1:]), kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


# Families whose absolute position embeddings are sized by config.image_size and used as they are
# unless the caller passes interpolate_pos_encoding (a plain pipeline() does not).
FIXED_POSITIONS = ("vit", "deit")


def fit_position_embeddings(model, size: int) -> bool:
    """Make size x size the model's own input size, as mmpretrain resizes a checkpoint's pos_embed
    to the img_size it fine-tunes at: the position embeddings are interpolated once (the family's
    own interpolate_pos_encoding) and config.image_size set, so training needs no interpolation
    per step and the saved model runs at that size in a plain pipeline(). -> whether it changed."""
    config = model.config
    if config.model_type not in FIXED_POSITIONS or config.image_size == size or size % config.patch_size:
        return False
    embeddings = model.get_submodule(FAMILIES[config.model_type].embeddings)
    old = embeddings.position_embeddings
    special = old.shape[1] - (config.image_size // config.patch_size) ** 2  # class (and distillation) tokens
    patches = (size // config.patch_size) ** 2
    with torch.no_grad():
        new = embeddings.interpolate_pos_encoding(old.new_zeros(1, patches + special, old.shape[2]), size, size)
    embeddings.position_embeddings = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
    for module in (embeddings, embeddings.patch_embeddings):  # each checks the input against its own copy
        if hasattr(module, "image_size"):
            module.image_size = (size, size)
    embeddings.patch_embeddings.num_patches = patches
    config.image_size = size
    return True


def _image_size(config) -> tuple:
    size = getattr(config, "image_size", None)  # read per batch: fit_position_embeddings may change it
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def check_input_size(model, height, width, where):
    """Refuse, before training, an input size the model does not run at: one forward pass of
    a blank image of that size, whatever the family's rule is."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values=torch.zeros(1, 3, height, width, dtype=torch.uint8,
                                           device=next(model.parameters()).device))
    except Exception as exc:  # the family's own check, whatever it raises
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        native = getattr(model.config, "image_size", None)
        hint = f"; it is built for {native}x{native}" if isinstance(native, int) else ""
        raise RecipeError(f"{where}: the pipeline makes {height}x{width} images, which "
                          f"{type(model).__name__} does not take ({text}){hint}; resize or crop to a size it "
                          f"accepts") from None
    finally:
        model.train(was_training)


def loss_function(model_cfg, num_labels):
    """The recipe's loss on (logits, labels): the ResNet's `classification_loss` with these
    settings, for the Trainer to apply to a Hub model's logits."""
    loss = model_cfg.loss
    settings = types.SimpleNamespace(
        problem_type="multi_label_classification" if model_cfg.multi_label else "single_label_classification",
        num_labels=num_labels, loss_type=loss.type, use_sigmoid=loss.use_sigmoid,
        label_smoothing=loss.smoothing(), loss_weight=loss.loss_weight, focal_gamma=loss.gamma,
        focal_alpha=loss.alpha, asymmetric_gamma_pos=loss.gamma_pos, asymmetric_gamma_neg=loss.gamma_neg,
        asymmetric_clip=loss.clip)
    return functools.partial(classification_loss, config=settings)


# ----------------------------------------------------------------------------- layers
def layer_map(model):
    """(layer_id(parameter name), number of layers) per FAMILIES, or None for a family that
    has no notion of layers."""
    model_type = model.config.model_type
    if model_type == TIMM_TYPE:
        return _timm_layers(model)
    family = FAMILIES.get(model_type)
    if family is None:
        return None
    blocks = len(model.get_submodule(family.blocks))
    pattern = re.compile(re.escape(family.blocks) + r"\.(\d+)\.")

    def layer_id(name):
        if name.startswith(family.embeddings + "."):
            return 0
        match = pattern.match(name)
        return int(match.group(1)) + 1 if match else blocks + 1

    return layer_id, blocks + 2


def _timm_layers(model):
    """timm's grouping (group_matcher(coarse=False)), as its param_groups_layer_decay uses it."""
    from timm.models import group_parameters

    timm_model = model.timm_model
    if not hasattr(timm_model, "group_matcher"):
        return None
    ids = {f"timm_model.{name}": group
           for name, group in group_parameters(timm_model, timm_model.group_matcher(coarse=False),
                                               reverse=True).items()}
    last = max(ids.values())
    return (lambda name: ids.get(name, last)), last + 1


def frozen_layers(model, frozen_stages, key):
    """(is_frozen(parameter name), the modules to keep in eval mode) for frozen_stages: layers
    0..frozen_stages of layer_map, and the modules lying wholly in them (whole embeddings and
    blocks, so their dropout and norms are in eval mode too)."""
    if frozen_stages < 0:
        return (lambda name: False), []
    layers = layer_map(model)
    if layers is None:
        raise RecipeError(f"{key}: {model.config.model_type!r} models have no stages to freeze here (known: "
                          f"{', '.join(sorted(FAMILIES))}, timm); set it to -1")
    layer_id, num_layers = layers
    if frozen_stages > num_layers - 2:
        family = FAMILIES.get(model.config.model_type)
        unit = family.unit if family else "layer groups of timm's group_matcher"
        raise RecipeError(f"{key}: {frozen_stages} is more than the model has ({num_layers - 2} {unit}); "
                          f"expected -1..{num_layers - 2}")
    frozen = lambda name: layer_id(name) <= frozen_stages  # noqa: E731
    modules = {}  # outermost first (named_modules walks parents before children)
    for name, module in model.named_modules():
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        inside = any(name.startswith(outer + ".") for outer in modules)
        if params and not inside and all(map(frozen, params)):
            modules[name] = module
    return frozen, list(modules.values())
