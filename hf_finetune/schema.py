"""Every recipe key that exists, in one place: the knob catalogue.

A recipe mirrors an mmcls 1.x config (same section and key names), so this file reads like
the union of the tutorial's base configs. `recipe.validate` walks a merged recipe against
`RECIPE` and rejects unknown keys, unknown `type`s and values of the wrong JSON type; the
modules that build things (data, models, training) check value ranges.
"""

from dataclasses import dataclass, field


class Number:
    """An int or a float (JSON has one number type); never a bool."""


class Integer:
    """An int; never a bool."""


class Anything:
    """Any JSON value; checked by the module that uses it."""


@dataclass
class Section:
    """A dict with a fixed set of keys."""

    keys: dict
    open: bool = False  # True: extra keys allowed (passed through, checked elsewhere)


@dataclass
class Typed:
    """A dict whose `type` key picks which Section applies."""

    types: dict  # type name -> Section (its keys, `type` excluded)
    default: str | None = None  # the type assumed when `type` is absent


@dataclass
class ListOf:
    item: object


@dataclass
class OneOf:
    """Any of several specs (e.g. an int or a list of ints)."""

    options: tuple = field(default_factory=tuple)


NUMBER_LIST = ListOf(Number)
INT_OR_INTS = OneOf((Integer, ListOf(Integer)))
OPT_STR = OneOf((str, type(None)))

# --- model ---------------------------------------------------------------------------------

PRETRAINED_INIT = Typed(
    {
        "Pretrained": Section(
            {"checkpoint": str, "prefix": OPT_STR, "allow_partial": bool}
        ),
    }
)
INIT_CFG = OneOf((PRETRAINED_INIT, type(None)))

RESNET_BACKBONE = Section(
    {
        "depth": Integer,
        "num_stages": Integer,
        "out_indices": INT_OR_INTS,
        "style": str,
        "frozen_stages": Integer,
        "norm_eval": bool,
        "deep_stem": bool,
        "avg_down": bool,
        "in_channels": Integer,
        "stem_channels": Integer,
        "base_channels": Integer,
        "zero_init_residual": bool,
        "with_cp": bool,
        "init_cfg": INIT_CFG,
    }
)

LOSS = Typed(
    {
        "CrossEntropyLoss": Section(
            {"loss_weight": Number, "label_smoothing": Number}
        ),
        "LabelSmoothLoss": Section(
            {"label_smooth_val": Number, "loss_weight": Number}
        ),
    },
    default="CrossEntropyLoss",
)

MODEL = Typed(
    {
        "ImageClassifier": Section(
            {
                "backbone": Typed({"ResNet": RESNET_BACKBONE}),
                "neck": OneOf((Typed({"GlobalAveragePooling": Section({})}),
                               type(None))),
                "head": Typed(
                    {
                        "LinearClsHead": Section(
                            {
                                "num_classes": Integer,
                                "in_channels": Integer,
                                "loss": LOSS,
                                "topk": INT_OR_INTS,
                            }
                        )
                    }
                ),
            }
        )
    },
    default="ImageClassifier",
)

DATA_PREPROCESSOR = Typed(
    {
        "ClsDataPreprocessor": Section(
            {"num_classes": Integer, "mean": NUMBER_LIST, "std": NUMBER_LIST,
             "to_rgb": bool}
        )
    },
    default="ClsDataPreprocessor",
)

# --- data ----------------------------------------------------------------------------------

# Pipeline steps: the names are checked here against the data registry; their arguments are
# checked by the steps themselves (hf_finetune/data/transforms.py), where they are defined.
PIPELINE_STEP = "pipeline-step"

_DATASET_COMMON = {
    "data_root": OPT_STR,
    "split": str,
    "pipeline": ListOf(PIPELINE_STEP),
    "indices": OneOf((Integer, ListOf(Integer), type(None))),
    "on_corrupt": str,
}
_HUB_DATASET = {
    "hub_id": str,
    "config_name": OPT_STR,
    "revision": OPT_STR,
    "image_column": str,
    "label_column": str,
}
DATASET = Typed(
    {
        "CIFAR10": Section({**_DATASET_COMMON, **_HUB_DATASET}),
        "HFImageDataset": Section({**_DATASET_COMMON, **_HUB_DATASET}),
        "SyntheticCIFAR10": Section({**_DATASET_COMMON, "num_samples": Integer, "seed": Integer}),
    }
)

DATALOADER = Section(
    {
        "batch_size": Integer,
        "num_workers": Integer,
        "persistent_workers": bool,
        "pin_memory": bool,
        "prefetch_factor": OneOf((Integer, type(None))),
        "drop_last": bool,
        "sampler": Typed({"DefaultSampler": Section({"shuffle": bool})},
                         default="DefaultSampler"),
        "dataset": DATASET,
    }
)

EVALUATOR = OneOf(
    (
        Typed({"Accuracy": Section({"topk": INT_OR_INTS})}),
        ListOf(Typed({"Accuracy": Section({"topk": INT_OR_INTS})})),
    )
)

# --- schedule ------------------------------------------------------------------------------

OPTIMIZER = Typed(
    {
        "SGD": Section({"lr": Number, "momentum": Number, "weight_decay": Number,
                        "nesterov": bool, "dampening": Number}),
        "AdamW": Section({"lr": Number, "betas": NUMBER_LIST, "eps": Number,
                          "weight_decay": Number, "amsgrad": bool}),
        "Adam": Section({"lr": Number, "betas": NUMBER_LIST, "eps": Number,
                         "weight_decay": Number, "amsgrad": bool}),
    }
)

PARAMWISE = Section(
    {
        "custom_keys": Anything,  # {substring: {lr_mult, decay_mult}}; checked in training.py
        "norm_decay_mult": Number,
        "bias_decay_mult": Number,
    }
)

OPTIM_WRAPPER = Typed(
    {
        name: Section(
            {
                "optimizer": OPTIMIZER,
                "paramwise_cfg": PARAMWISE,
                "clip_grad": OneOf((Section({"max_norm": Number, "norm_type": Number}),
                                    type(None))),
                "accumulative_counts": Integer,
                "dtype": str,
            }
        )
        for name in ("OptimWrapper", "AmpOptimWrapper")
    },
    default="OptimWrapper",
)

_SCHED_COMMON = {"by_epoch": bool, "begin": Integer, "end": Integer,
                 "convert_to_iter_based": bool}
SCHEDULER = Typed(
    {
        "MultiStepLR": Section({**_SCHED_COMMON, "milestones": ListOf(Integer), "gamma": Number}),
        "StepLR": Section({**_SCHED_COMMON, "step_size": Integer, "gamma": Number}),
        "CosineAnnealingLR": Section({**_SCHED_COMMON, "T_max": Integer, "eta_min": Number,
                                      "eta_min_ratio": Number}),
        "LinearLR": Section({**_SCHED_COMMON, "start_factor": Number, "end_factor": Number}),
        "ConstantLR": Section({**_SCHED_COMMON, "factor": Number}),
    }
)

TRAIN_CFG = Section(
    {
        "type": str,
        "by_epoch": bool,
        "max_epochs": Integer,
        "max_iters": Integer,
        "val_interval": Integer,
        "total_batch_size": OneOf((Integer, type(None))),
    }
)

# --- runtime -------------------------------------------------------------------------------

HOOK = Section({"type": str}, open=True)
DEFAULT_HOOKS = Section(
    {
        "timer": HOOK,
        "logger": Section({"type": str, "interval": Integer}),
        "param_scheduler": HOOK,
        "checkpoint": Section(
            {"type": str, "interval": Integer, "max_keep_ckpts": Integer,
             "save_best": OneOf((str, type(None))), "rule": str, "by_epoch": bool}
        ),
        "sampler_seed": HOOK,
        "visualization": HOOK,
    }
)

RANDOMNESS = Section({"seed": OneOf((Integer, type(None))), "deterministic": bool,
                      "diff_rank_seed": bool})

RECIPE = Section(
    {
        "_base_": Anything,  # consumed by the loader before validation
        "model": MODEL,
        "data_preprocessor": DATA_PREPROCESSOR,
        "train_dataloader": DATALOADER,
        "val_dataloader": DATALOADER,
        "test_dataloader": DATALOADER,
        "val_evaluator": EVALUATOR,
        "test_evaluator": EVALUATOR,
        "optim_wrapper": OPTIM_WRAPPER,
        "param_scheduler": OneOf((SCHEDULER, ListOf(SCHEDULER))),
        "train_cfg": TRAIN_CFG,
        "val_cfg": Section({"type": str}),
        "test_cfg": Section({"type": str}),
        "auto_scale_lr": Section({"base_batch_size": Integer, "enable": bool}),
        "default_scope": str,
        "default_hooks": DEFAULT_HOOKS,
        # channels_last (ours): model and input in NHWC, faster convolutions on GPUs.
        "env_cfg": Section({"cudnn_benchmark": bool, "channels_last": bool, "mp_cfg": Anything,
                            "dist_cfg": Anything}),
        "visualizer": Anything,
        "log_level": str,
        "load_from": OPT_STR,
        "resume": bool,
        "randomness": RANDOMNESS,
        "work_dir": str,
        # Hugging Face only: transformers.TrainingArguments fields, checked in recipe.py
        # against the dataclass itself so every field of the installed version is accepted.
        "training_args": "training-args",
    }
)
