"""hf_finetune: the MMClassification fine-tuning tutorial on the Hugging Face stack.

Public API:
    load_recipe(path, cfg_options=None)  -> Config (typed, every key checked)
    build_datasets(cfg)                  -> datasets.DatasetDict (train / val / test)
    build_model(cfg.model, cfg.data_preprocessor, id2label) -> FinetuneResNetForImageClassification
                                         (a transformers model for HuggingFaceClassifier / TimmClassifier)
    build_trainer(cfg, datasets=None, model=None) -> transformers.Trainer

Importing the package registers the model with AutoConfig / AutoModelForImageClassification.
"""

from hf_finetune.errors import CheckpointError, DataError, RecipeError, TrainingError, UserError
from hf_finetune.config import Config, load_config
from hf_finetune.config import load_config as load_recipe
from hf_finetune.models import (  # registers the Auto classes
    FinetuneResNetConfig,
    FinetuneResNetForImageClassification,
    build_model,
)

__version__ = "0.1.0"

__all__ = [
    "Config",
    "load_config",
    "load_recipe",
    "build_datasets",
    "label_names",
    "build_model",
    "build_trainer",
    "FinetuneResNetConfig",
    "FinetuneResNetForImageClassification",
    "UserError",
    "RecipeError",
    "DataError",
    "CheckpointError",
    "TrainingError",
]


def __getattr__(name):
    # datasets and the Trainer are imported when first asked for.
    if name in ("build_datasets", "label_names"):
        from hf_finetune import data

        return getattr(data, name)
    if name == "build_trainer":
        from hf_finetune.training import build_trainer

        return build_trainer
    raise AttributeError(f"module 'hf_finetune' has no attribute {name!r}")
