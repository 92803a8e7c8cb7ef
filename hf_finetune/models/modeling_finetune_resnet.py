"""mmcls ImageClassifier(ResNet, GlobalAveragePooling, LinearClsHead) as a transformers PreTrainedModel.

Self-contained on purpose: this file is copied next to saved weights and imported with
``trust_remote_code=True`` where the hf_finetune package is not installed, so it may only
import torch / transformers and its sibling configuration file.
"""

import torch
from torch import nn
from transformers import PreTrainedModel, ResNetModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.resnet.modeling_resnet import ResNetBasicLayer, ResNetBottleNeckLayer

from .configuration_finetune_resnet import FinetuneResNetConfig

try:
    # transformers >= 5: init functions that skip tensors already loaded from a checkpoint.
    from transformers import initialization as init
except ImportError:
    init = nn.init


class LinearClsHead(nn.Module):
    """mmcls LinearClsHead: one linear layer on the pooled features (module path `head.fc`)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class FinetuneResNetForImageClassification(PreTrainedModel):
    """ResNet (transformers' ResNetModel) -> global average pooling -> linear head -> cross entropy.

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

    def __init__(self, config: FinetuneResNetConfig):
        super().__init__(config)
        self.backbone = ResNetModel(config.backbone_config())
        self.head = LinearClsHead(config.feature_channels, config.num_labels)
        # Non-persistent: derived from the config, so the state dict holds only weights.
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.post_init()
        self._freeze_stages()

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
        pixel_values = (pixel_values.float() - self.pixel_mean) / self.pixel_std
        return pixel_values.to(self.backbone.embedder.embedder.convolution.weight.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            self.normalize(pixel_values), output_hidden_states=output_hidden_states, return_dict=True
        )
        # GlobalAveragePooling neck: ResNetModel's pooler output [N, C, 1, 1].
        features = torch.flatten(outputs.pooler_output, 1)
        logits = self.head(features)

        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits.float(), labels.to(logits.device).long(), label_smoothing=self.config.label_smoothing
            )
            loss = loss * self.config.loss_weight

        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = ["FinetuneResNetForImageClassification", "LinearClsHead"]
