"""Native export: a work dir's model as a plain transformers image classifier.

Our ResNet is transformers' ResNetModel (`backbone.*`) + a linear head (`head.fc.*`); the
native class is the same ResNetModel (`resnet.*`) + Sequential(Flatten, Linear)
(`classifier.1.*`). So its export is a key rename plus the backbone's own ResNetConfig.
A Hub model's work dir (HuggingFaceClassifier / TimmClassifier recipes) already holds a plain
transformers model: its export is that model and its image processor, nothing else of the
work dir. Either result loads with AutoModelForImageClassification /
pipeline("image-classification") and no remote code.
"""

from __future__ import annotations

import logging
import os
import shutil

from hf_finetune.errors import CheckpointError
from hf_finetune.hub.processor import PROCESSOR_FILE, processor_dict, read_json, save_image_processor, saved_config

logger = logging.getLogger("hf_finetune.hub")

FIRST_CONV = "resnet.embedder.embedder.convolution.weight"
RESNET_MODEL_TYPE = "finetune_resnet"  # FinetuneResNetConfig.model_type (read here without importing the model)
KEY_MAP = (("backbone.", "resnet."), ("head.fc.", "classifier.1."))


def check_work_dir(work_dir: str) -> None:
    """A finished work dir has the saved model; say what is missing otherwise."""
    if not os.path.isdir(work_dir):
        raise CheckpointError(f"work dir {work_dir!r} does not exist")
    required = ("config.json", "model.safetensors")
    missing = [name for name in required if not os.path.exists(os.path.join(work_dir, name))]
    if missing:
        raise CheckpointError(
            f"work dir {work_dir!r} has no {' / '.join(missing)}: it is not a finished training output "
            "(the final model is saved when training ends)"
        )


def load_work_dir_model(work_dir: str):
    """Our model from a work dir (the package's class; the work dir's own code without it)."""
    check_work_dir(work_dir)
    try:
        from hf_finetune.models.modeling_finetune_resnet import FinetuneResNetForImageClassification
    except ImportError:
        FinetuneResNetForImageClassification = None
    try:
        if FinetuneResNetForImageClassification is not None:
            model = FinetuneResNetForImageClassification.from_pretrained(work_dir)
        else:
            from transformers import AutoModelForImageClassification

            model = AutoModelForImageClassification.from_pretrained(work_dir, trust_remote_code=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the model saved in {work_dir!r}: {exc}") from exc
    return model.eval()


def rename_state_dict(state_dict: dict, to_rgb: bool) -> dict:
    """Our keys -> ResNetForImageClassification keys (non-weight entries are dropped)."""
    renamed = {}
    for key, tensor in state_dict.items():
        for ours, theirs in KEY_MAP:
            if key.startswith(ours):
                renamed[theirs + key[len(ours):]] = tensor
                break
    if to_rgb:
        # Our model flips the input channels before the first conv; flipping that conv's
        # input-channel axis instead gives the same output on unflipped input.
        renamed[FIRST_CONV] = renamed[FIRST_CONV].flip(1).contiguous()
    return renamed


def native_config(model):
    """The backbone's ResNetConfig with the classifier's labels."""
    from transformers import ResNetConfig

    values = model.backbone.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "auto_map", "architectures", "model_type"):
        values.pop(key, None)
    id2label = {int(i): str(name) for i, name in model.config.id2label.items()}
    values.update(
        architectures=["ResNetForImageClassification"],
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        problem_type=model.config.problem_type or "single_label_classification",
    )
    return ResNetConfig.from_dict(values)


def _check_same_outputs(ours, native, processor: dict) -> None:
    """The exported model on processor output == our model on the raw uint8 image."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator)
    mean = torch.tensor(processor["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(processor["image_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ours(pixel_values=images).logits
        got = native(pixel_values=(images.float() / 255 - mean) / std).logits
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        difference = (expected - got).abs().max().item()
        raise CheckpointError(f"native export does not reproduce the model (max logit difference {difference:.3g})")


def is_hub_model(config: dict) -> bool:
    """config.json is a plain transformers model's (a HuggingFaceClassifier / TimmClassifier run),
    not our ResNet's (remote code); an empty one reads as ours."""
    return (config.get("model_type") or RESNET_MODEL_TYPE) != RESNET_MODEL_TYPE


def is_resnet_work_dir(work_dir: str) -> bool:
    """The work dir holds our ResNet, not a plain transformers model from the Hub."""
    return not is_hub_model(read_json(os.path.join(work_dir, "config.json")) or {})


def export_hub_model(work_dir: str, out_dir: str) -> str:
    """A Hub model's work dir -> OUT_DIR: the model as transformers saves it + the work dir's
    image processor. Loaded first as anyone will load it (plain from_pretrained, no remote
    code), so what is written is known to load; the weights are checked finite before that."""
    from transformers import AutoModelForImageClassification

    from hf_finetune.models.checkpoints import verify_weights

    config = read_json(os.path.join(work_dir, "config.json")) or {}
    if config.get("auto_map"):
        raise CheckpointError(f"the model in {work_dir!r} runs code from its folder (auto_map in config.json); "
                              "export writes only models that load without remote code")
    processor = os.path.join(work_dir, PROCESSOR_FILE)
    if not os.path.isfile(processor):
        raise CheckpointError(f"work dir {work_dir!r} has no {PROCESSOR_FILE} (written when training ends), so "
                              "the preprocessing the model expects is unknown")
    verify_weights(work_dir, key=work_dir)
    try:
        model = AutoModelForImageClassification.from_pretrained(work_dir)
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        timm = ' (a timm model needs timm: pip install "hf_finetune[timm]")' if isinstance(exc, ImportError) else ""
        raise CheckpointError(f"cannot load the model saved in {work_dir!r}: {reason}{timm}") from None
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # The file itself, not the class's save_pretrained: the processor class may be one that
    # does not save itself (timm's keeps its settings in config.json).
    shutil.copyfile(processor, os.path.join(out_dir, PROCESSOR_FILE))
    logger.info("exported %s as a transformers %s to %s", work_dir, type(model).__name__, out_dir)
    return out_dir


def export_transformers(work_dir: str, out_dir: str) -> str:
    """Write OUT_DIR: a plain transformers model (weights + config.json) + preprocessor_config.json.

    Returns out_dir. Our ResNet becomes a ResNetForImageClassification that gives the same
    logits as ours on the same images; a Hub model is written as it is (export_hub_model).
    """
    from transformers import ResNetForImageClassification

    work_dir, out_dir = str(work_dir), str(out_dir)
    check_work_dir(work_dir)
    if not is_resnet_work_dir(work_dir):
        return export_hub_model(work_dir, out_dir)
    ours = load_work_dir_model(work_dir)
    native = ResNetForImageClassification(native_config(ours)).eval()
    state_dict = rename_state_dict(ours.state_dict(), to_rgb=bool(getattr(ours.config, "to_rgb", False)))
    result = native.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"cannot map the model in {work_dir!r} onto ResNetForImageClassification: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )

    # The same image processor as the work dir's (remote-code) model, so both give the same
    # predictions; generated from the config and recipe when the work dir has none.
    processor = read_json(os.path.join(work_dir, PROCESSOR_FILE))
    if processor is None:
        processor = processor_dict(ours.config, saved_config(work_dir))
    _check_same_outputs(ours, native, processor)

    os.makedirs(out_dir, exist_ok=True)
    native.save_pretrained(out_dir)
    save_image_processor(processor, out_dir)
    logger.info("exported %s as a transformers ResNetForImageClassification to %s", work_dir, out_dir)
    return out_dir
