"""Batch augments on the device: mmpretrain's `model.train_cfg.augments` (Mixup, CutMix).

As mmpretrain's RandomBatchAugment, one augment is chosen per batch (by `probs`, else
uniformly; with `probs` summing to less than 1 the rest is "no augment"), and it mixes the
batch with a permutation of itself under one ratio lambda ~ Beta(alpha, alpha). Labels become
one-hot scores mixed with the same weights as the pixels; the model takes these soft targets
[N, K] as `labels` (cross entropy against probabilities, as mmpretrain's gt_score).

Label smoothing: mmpretrain smooths the one-hot scores (LabelSmoothLoss, mode "original":
(1 - eps) * onehot + eps / K) of the mixed targets. Smoothing is affine and the mixing
weights sum to 1, so smoothing before or after mixing gives the same targets; torch's
`label_smoothing` on probability targets, which the model's loss uses, is that formula.

uint8 batches stay uint8 (the model normalises uint8 on the device): CutMix copies pixels,
Mixup rounds the mixed values, as timm's uint8 collate mixup does. Float batches are mixed
as they are.

The recipe's values arrive checked (hf_finetune.config: MixupCfg, CutMixCfg, probs).

Randomness: each batch draws from a numpy Generator seeded with (seed, rank, batch index),
so a run is reproducible per seed and ranks differ. Registered as a Trainer callback, the
batch index restarts where a resumed run left off, so it draws what the uninterrupted run
would have drawn.
"""

import math

import numpy as np
import torch
from torch.nn import functional as F
from transformers import TrainerCallback


class Mixup:
    """Blend each image with another of the batch: lam * x + (1 - lam) * x[perm]."""

    def __init__(self, cfg):
        self.alpha = cfg.alpha

    def mix(self, images, scores, rng):
        lam = rng.beta(self.alpha, self.alpha)
        index = torch.from_numpy(rng.permutation(len(images))).to(images.device)
        if images.is_floating_point():
            mixed = images * lam + images[index] * (1 - lam)
        else:  # in place on fresh float copies: half the passes over the batch
            mixed = images.float().mul_(lam).add_(images[index].float(), alpha=1 - lam)
            mixed = mixed.round_().to(images.dtype)
        return mixed, scores * lam + scores[index] * (1 - lam)


class CutMix:
    """Paste a box of another image of the batch; lam is the share of the image kept.

    The box has sides sqrt(1 - lam) of the image's around a uniform centre, clipped to the
    image, and lam is corrected to the clipped area (`correct_lam`). With `cutmix_minmax`
    [min, max], the box sides are uniform in those fractions of the image sides instead
    (alpha then does not matter) and lam is always the area share.
    """

    def __init__(self, cfg):
        self.alpha = cfg.alpha
        self.cutmix_minmax = cfg.cutmix_minmax
        self.correct_lam = cfg.correct_lam

    def _side(self, size, rng):
        # Uniform in [min, max) of the side (at least one value on tiny images); max < 1
        # keeps the side below the image's, so the box always fits.
        low, high = (int(size * f) for f in self.cutmix_minmax)
        return int(rng.integers(low, max(high, low + 1)))

    def box(self, height, width, lam, rng):
        """(top, bottom, left, right) of the pasted box."""
        if self.cutmix_minmax is not None:
            cut_h, cut_w = (self._side(size, rng) for size in (height, width))
            top, left = int(rng.integers(0, height - cut_h)), int(rng.integers(0, width - cut_w))
            return top, top + cut_h, left, left + cut_w
        ratio = math.sqrt(1 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        return int(top), int(bottom), int(left), int(right)

    def mix(self, images, scores, rng):
        lam = rng.beta(self.alpha, self.alpha)
        index = torch.from_numpy(rng.permutation(len(images))).to(images.device)
        height, width = images.shape[-2:]
        top, bottom, left, right = self.box(height, width, lam, rng)
        if self.correct_lam or self.cutmix_minmax is not None:
            lam = 1 - (bottom - top) * (right - left) / (height * width)
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images[index, :, top:bottom, left:right]
        return mixed, scores * lam + scores[index] * (1 - lam)


BATCH_AUGMENTS = {"Mixup": Mixup, "CutMix": CutMix}


class BatchAugments(TrainerCallback):
    """The recipe's `model.train_cfg` (`augments`, `probs`) as one callable.

    `__call__(pixel_values [N, C, H, W] uint8 or float, labels [N] int)` returns
    (mixed pixel values, same dtype and device; soft targets [N, num_classes] float32).
    Call it once per training batch (micro-batch with gradient accumulation).
    """

    def __init__(self, train_cfg, num_classes, seed=0, rank=0):
        self.augments = [BATCH_AUGMENTS[entry.type](entry) for entry in train_cfg.augments]
        self.probs = None  # uniform
        if train_cfg.probs is not None:  # mmpretrain's: one per augment; the rest is no augment
            probs = train_cfg.probs if isinstance(train_cfg.probs, list) else [train_cfg.probs]
            self.probs = probs + [max(0.0, 1.0 - sum(probs))]
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.rank = int(rank)
        self.batches_seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed at update k: the batches before it were drawn by the interrupted run.
        self.batches_seen = state.global_step * args.gradient_accumulation_steps

    def choose(self, rng):
        """The augment for this batch, or None (no augment, only with probs)."""
        if self.probs is None:
            return self.augments[rng.integers(len(self.augments))]
        return (self.augments + [None])[rng.choice(len(self.probs), p=self.probs)]

    def __call__(self, pixel_values, labels):
        rng = np.random.default_rng([self.seed, self.rank, self.batches_seen])
        self.batches_seen += 1
        scores = F.one_hot(labels.long(), self.num_classes).float()
        augment = self.choose(rng)
        if augment is None:
            return pixel_values, scores
        return augment.mix(pixel_values, scores, rng)

