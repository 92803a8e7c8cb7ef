"""mmcls ImageClassifier(ResNet, GlobalAveragePooling, LinearClsHead) as a transformers PreTrainedModel.

Self-contained on purpose: this file is copied next to saved weights and imported with
``trust_remote_code=True`` where the hf_finetune package is not installed, so it may only
import torch / transformers and its sibling configuration file.
"""

import contextlib
import functools

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, ResNetModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.resnet.modeling_resnet import ResNetBasicLayer, ResNetBottleNeckLayer

from .configuration_finetune_resnet import FinetuneResNetConfig

try:
    # transformers >= 5: init functions that skip tensors already loaded from a checkpoint.
    from transformers import initialization as init
except ImportError:
    init = nn.init

# Key names of a transformers ResNetForImageClassification checkpoint -> ours (from_pretrained).
TRANSFORMERS_KEY_MAPPING = {r"^resnet\.": "backbone.", r"^classifier\.1\.": "head.fc."}


# ----------------------------------------------------------------------------- losses
def infer_problem_type(config, labels: torch.Tensor) -> str:
    """transformers' rule (ResNetForImageClassification), stored in the config as there.

    One output is regression; integer labels are single-label; anything else multi-label.
    """
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    return config.problem_type


def sigmoid_focal_loss(logits, targets, gamma: float, alpha: float) -> torch.Tensor:
    """mmpretrain `sigmoid_focal_loss`, per element (no reduction)."""
    probs = logits.sigmoid()
    pt = (1 - probs) * targets + probs * (1 - targets)
    focal_weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * focal_weight


def asymmetric_loss(logits, targets, gamma_pos: float, gamma_neg: float, clip: float, eps=1e-8) -> torch.Tensor:
    """mmpretrain `asymmetric_loss` (use_sigmoid=True), per element (no reduction)."""
    probs = logits.sigmoid()
    # The clip shifts negatives' probability down: easy negatives give no loss at all.
    negative = (1 - probs + clip).clamp(max=1) if clip > 0 else 1 - probs
    pt = negative * (1 - targets) + probs * targets
    weight = (1 - pt).pow(gamma_pos * targets + gamma_neg * (1 - targets))
    return -torch.log(pt.clamp(min=eps)) * weight


def _sigmoid_loss(logits, targets, config) -> torch.Tensor:
    """mmpretrain sigmoid losses: summed over classes, averaged over the batch (avg_factor=N)."""
    if config.loss_type == "FocalLoss":
        per_element = sigmoid_focal_loss(logits, targets, config.focal_gamma, config.focal_alpha)
    elif config.loss_type == "AsymmetricLoss":
        per_element = asymmetric_loss(logits, targets, config.asymmetric_gamma_pos, config.asymmetric_gamma_neg,
                                      config.asymmetric_clip)
    else:
        per_element = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return per_element.sum() / logits.shape[0]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """The loss for `config.problem_type` (inferred when unset) and `config.loss_type`, times loss_weight."""
    problem_type = infer_problem_type(config, labels)
    logits, labels = logits.float(), labels.to(logits.device)
    sigmoid = config.loss_type in ("FocalLoss", "AsymmetricLoss") or config.use_sigmoid
    if problem_type == "regression":
        if sigmoid or config.loss_type == "LabelSmoothLoss":
            raise ValueError(f"loss_type={config.loss_type!r} (use_sigmoid={config.use_sigmoid}) does not apply "
                             "to problem_type='regression', which uses the mean squared error")
        if config.num_labels == 1:
            loss = F.mse_loss(logits.squeeze(), labels.squeeze().float())
        else:
            loss = F.mse_loss(logits, labels.float())
    elif problem_type == "single_label_classification":
        # Soft targets [N, C] (Mixup / CutMix scores) stand in for class indices, as mmpretrain's gt_score.
        soft = labels.is_floating_point() and labels.shape == logits.shape
        targets = labels.float() if soft else F.one_hot(labels.view(-1).long(), config.num_labels).float()
        if sigmoid:
            loss = _sigmoid_loss(logits, targets, config)
        elif soft:
            loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
        else:
            loss = F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1).long(),
                                   label_smoothing=config.label_smoothing)
    elif problem_type == "multi_label_classification":
        if config.loss_type == "LabelSmoothLoss" or config.label_smoothing:
            raise ValueError("label smoothing applies to single-label classification only; "
                             f"problem_type is {problem_type!r}")
        if sigmoid:
            loss = _sigmoid_loss(logits, labels.float(), config)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float())
    else:
        raise ValueError(f"problem_type={problem_type!r} is not supported; expected 'single_label_classification', "
                         "'multi_label_classification' or 'regression'")
    return loss * config.loss_weight


@contextlib.contextmanager
def keep_batchnorm_statistics(module: nn.Module):
    """Restore BatchNorm running statistics after the block runs: the recomputation of a
    checkpointed block must not count its batch a second time."""
    buffers = [buffer for norm in module.modules() if isinstance(norm, nn.modules.batchnorm._BatchNorm)
               for buffer in norm.buffers(recurse=False)]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        # Through `.data`: a reentrant recomputation runs backward after this restore, and BatchNorm's
        # backward holds the running statistics (unused in training mode) under their version counter.
        for buffer, value in zip(buffers, saved):
            buffer.data.copy_(value)


def checkpoint_keeping_statistics(checkpoint_function, block: nn.Module, function, *args, **kwargs):
    """`checkpoint_function` (torch's checkpoint with the gradient_checkpointing_kwargs) on `block`'s forward,
    whose recomputations in backward keep the BatchNorm statistics the forward left.

    The first call of `function` is the forward; any later one is a recomputation. torch's own hook for
    this, `context_fn`, refuses use_reentrant=True, which transformers lets the user choose.
    """
    calls = 0

    def run(*inner_args, **inner_kwargs):
        nonlocal calls
        calls += 1
        with contextlib.nullcontext() if calls == 1 else keep_batchnorm_statistics(block):
            return function(*inner_args, **inner_kwargs)

    return checkpoint_function(run, *args, **kwargs)


class FinetuneResNetBasicLayer(GradientCheckpointingLayer, ResNetBasicLayer):
    """transformers' ResNetBasicLayer, checkpointed when `gradient_checkpointing_enable()` is on."""


class FinetuneResNetBottleNeckLayer(GradientCheckpointingLayer, ResNetBottleNeckLayer):
    """transformers' ResNetBottleNeckLayer, checkpointed when `gradient_checkpointing_enable()` is on."""


CHECKPOINTING_LAYERS = {ResNetBasicLayer: FinetuneResNetBasicLayer,
                        ResNetBottleNeckLayer: FinetuneResNetBottleNeckLayer}


class LinearClsHead(nn.Module):
    """mmcls LinearClsHead: one linear layer on the pooled features (module path `head.fc`)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class FinetuneResNetForImageClassification(PreTrainedModel):
    """ResNet (transformers' ResNetModel) -> global average pooling -> linear head -> loss.

    `pixel_values` may be uint8 [N, 3, H, W] (converted and normalised here, on the model's
    device, with `config.mean` / `config.std`; `config.to_rgb` flips the channels first) or
    float (taken as already normalised, as an image processor produces it).
    """

    config_class = FinetuneResNetConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ResNetConvLayer", "ResNetShortCut"]
    # The loss is a per-batch mean: the Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = True

    def __init__(self, config: FinetuneResNetConfig):
        super().__init__(config)
        self.backbone = ResNetModel(config.backbone_config())
        # transformers' ResNet blocks are not GradientCheckpointingLayers (its ResNet has no gradient
        # checkpointing). The built blocks take the subclass in place: same modules, weights, initialisation
        # and state-dict keys as ResNetModel's, which rebuilding them would not all keep.
        for stage in self.backbone.encoder.stages:
            for block in stage.layers:
                block.__class__ = CHECKPOINTING_LAYERS[type(block)]
        self.head = LinearClsHead(config.feature_channels, config.num_labels)
        # Non-persistent: derived from the config, so the state dict holds only weights.
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.post_init()
        self._freeze_stages()
        if config.with_cp:
            # Newer transformers name it activation_checkpointing_enable (the old name warns).
            getattr(self, "activation_checkpointing_enable", self.gradient_checkpointing_enable)()

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, **kwargs):
        """transformers' switch (gradient_checkpointing_enable / _disable, the Trainer's gradient_checkpointing),
        with each block's recomputation keeping its BatchNorm running statistics: the batch is counted once.
        Frozen stages are in eval mode, so their blocks run without checkpointing."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)
        for block in self.modules():
            if isinstance(block, GradientCheckpointingLayer):
                block._gradient_checkpointing_func = functools.partial(
                    checkpoint_keeping_statistics, gradient_checkpointing_func, block)

    # ----------------------------------------------------------------- initialisation
    def _init_weights(self, module):
        """mmcls init for what ResNetModel does not initialise itself.

        The backbone's convs (Kaiming normal, fan_out, relu) and BatchNorms (1 / 0) are
        initialised by ResNetModel's own `_init_weights`, which is mmcls' ResNet init. The
        `init` functions skip tensors flagged as loaded, so `from_pretrained` keeps weights.
        """
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif module is self:
            self._reset_normalization_buffers()
            if self.config.zero_init_residual:
                for block in self.backbone.modules():
                    if isinstance(block, (ResNetBasicLayer, ResNetBottleNeckLayer)):
                        init.zeros_(block.layer[-1].normalization.weight)

    @torch.no_grad()
    def _reset_normalization_buffers(self):
        # Non-persistent buffers come back uninitialised from a meta-device from_pretrained.
        device = self.pixel_mean.device
        if device.type == "meta":
            return
        self.pixel_mean.copy_(torch.tensor(self.config.mean, device=device).view(1, 3, 1, 1))
        self.pixel_std.copy_(torch.tensor(self.config.std, device=device).view(1, 3, 1, 1))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # A transformers ResNet folder loads too: its config maps to a depth (see the config class).
        kwargs.setdefault("key_mapping", TRANSFORMERS_KEY_MAPPING)
        result = super().from_pretrained(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        model._reset_normalization_buffers()
        # Loaded parameters are created with requires_grad=True; re-apply the freezing.
        model._freeze_stages()
        return result

    # ----------------------------------------------------------------- freezing (mmcls semantics)
    def frozen_modules(self):
        """Stem for frozen_stages >= 0, plus stages 1..frozen_stages."""
        stages = self.config.frozen_stages
        if stages < 0:
            return []
        return [self.backbone.embedder] + [self.backbone.encoder.stages[i] for i in range(stages)]

    def _freeze_stages(self):
        for module in self.frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            # Frozen BatchNorms keep their running statistics (re-applied on every .train()).
            self._freeze_stages()
            if self.config.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    # ----------------------------------------------------------------- forward
    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, (x - mean) / std; float input is taken as already normalised.

        to_rgb flips the channel order of both: an image processor normalises RGB input with
        the mean/std in RGB order, so its output still needs the flip the model was trained with.
        """
        if self.config.to_rgb:
            pixel_values = pixel_values.flip(1)
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        # The input takes the weights' memory format in the one conversion copy: convolutions
        # then run the kernels the model was set up for (NCHW unless env_cfg.channels_last),
        # whatever layout the data pipeline handed over.
        weight = self.backbone.embedder.embedder.convolution.weight
        layout = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        pixel_values = pixel_values.to(torch.float32, memory_format=layout)
        pixel_values = (pixel_values - self.pixel_mean) / self.pixel_std
        return pixel_values.to(weight.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # Hidden states, when asked: the stem output then each of the four stages' outputs.
        outputs = self.backbone(self.normalize(pixel_values), output_hidden_states=output_hidden_states,
                                return_dict=True)
        hidden_states = outputs.hidden_states
        # GlobalAveragePooling neck: ResNetModel's pooler, [N, C, 1, 1] -> [N, C].
        features = torch.flatten(outputs.pooler_output, 1)
        logits = self.head(features)

        loss = classification_loss(logits, labels, self.config) if labels is not None else None

        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


__all__ = [
    "FinetuneResNetBasicLayer",
    "FinetuneResNetBottleNeckLayer",
    "FinetuneResNetForImageClassification",
    "LinearClsHead",
]
