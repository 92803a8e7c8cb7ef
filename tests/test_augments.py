"""Mixup / CutMix batch augments: mixing weights, lambda distribution, box area, seeding,
label smoothing, recipe validation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import TrainerControl, TrainerState

from hf_finetune.augments import BatchAugments
from hf_finetune.config import config_from_dict
from hf_finetune.errors import RecipeError
from hf_finetune.models import FinetuneResNetConfig
from hf_finetune.models.modeling_finetune_resnet import classification_loss

N, K = 8, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(augments, probs=None, head=None):
    return {"model": {"head": head or {"num_classes": K}, "train_cfg": {"augments": augments, "probs": probs}}}


def batch_augments(augments, probs=None, seed=0, rank=0):
    """BatchAugments from the recipe's model.train_cfg, checked by the config as in a run."""
    train_cfg = config_from_dict(recipe(augments, probs)).model.train_cfg
    return BatchAugments(train_cfg, K, seed=seed, rank=rank)


def batch(dtype=torch.float32, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(K, generator=g)[:N]  # distinct: each target row names its partner
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (N, 3, size, size), generator=g, dtype=torch.uint8)
    else:
        images = torch.rand(N, 3, size, size, generator=g, dtype=dtype)
    return images, labels


def partner_and_lam(targets, labels):
    """Per row: the index of the image mixed in (itself if none) and its own image's weight."""
    weights = targets[:, labels[: len(targets)]]  # [i, j]: weight of image j in row i
    own = weights.diagonal().clone()
    weights.fill_diagonal_(0)
    partner = torch.where(weights.amax(1) > 0, weights.argmax(1), torch.arange(len(targets)))
    return list(zip(partner.tolist(), own.tolist()))


def beta_cdf(x, alpha):
    grid = torch.linspace(1e-6, 1 - 1e-6, 20001, dtype=torch.float64)
    pdf = torch.distributions.Beta(torch.tensor(alpha, dtype=torch.float64),
                                   torch.tensor(alpha, dtype=torch.float64)).log_prob(grid).exp()
    cdf = torch.cumulative_trapezoid(pdf, grid)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf / cdf[-1]])
    return np.interp(x, grid.numpy(), cdf.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_mixup_blends_each_image_with_its_partner_by_the_target_weights(dtype):
    augments = batch_augments([{"type": "Mixup", "alpha": 0.8}], seed=1)
    images, labels = batch(dtype)
    mixed, targets = augments(images, labels)
    assert mixed.dtype == dtype and mixed.shape == images.shape
    assert targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(N))
    for i, (j, lam) in enumerate(partner_and_lam(targets, labels)):
        expected = lam * images[i].double() + (1 - lam) * images[j].double()
        if dtype == torch.uint8:
            assert (mixed[i].double() - expected).abs().max() <= 0.5 + 1e-4
        else:
            assert torch.allclose(mixed[i].double(), expected, atol=1e-5)


def test_mixup_lambda_follows_beta_alpha_alpha():
    alpha = 0.8
    augments = batch_augments([{"type": "Mixup", "alpha": alpha}], seed=3)
    images, labels = batch(size=2)
    lams = []
    for _ in range(3000):
        _, targets = augments(images, labels)
        lams += [lam for i, (j, lam) in enumerate(partner_and_lam(targets, labels)) if j != i][:1]
    lams = np.sort(lams)
    empirical = np.arange(1, len(lams) + 1) / len(lams)
    ks = np.abs(empirical - beta_cdf(lams, alpha)).max()
    assert ks < 1.63 / math.sqrt(len(lams))  # Kolmogorov-Smirnov at the 1% level


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_cutmix_pastes_one_box_whose_area_is_the_partner_weight(dtype):
    augments = batch_augments([{"type": "CutMix", "alpha": 1.0}], seed=5)
    images, labels = batch(dtype, size=32)
    for _ in range(20):
        mixed, targets = augments(images, labels)
        assert mixed.dtype == dtype
        assert torch.allclose(targets.sum(1), torch.ones(N))
        for i, (j, lam) in enumerate(partner_and_lam(targets, labels)):
            changed = (mixed[i] != images[i]).any(0)
            if j == i:
                assert not changed.any()
                continue
            assert torch.equal(mixed[i][:, changed], images[j][:, changed])
            rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
            if len(rows):  # the changed pixels form one rectangle
                box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                assert box.all()
            assert lam == pytest.approx(1 - changed.sum().item() / 32 ** 2, abs=1e-6)


def test_cutmix_minmax_draws_box_sides_in_range():
    augments = batch_augments([{"type": "CutMix", "alpha": 1.0, "cutmix_minmax": [0.25, 0.5]}], seed=2)
    images, labels = batch(size=40)
    sides = set()
    for _ in range(200):
        mixed, targets = augments(images, labels)
        i, j = next((i, j) for i, (j, _) in enumerate(partner_and_lam(targets, labels)) if j != i)
        changed = (mixed[i] != images[i]).any(0)
        height, width = changed.any(1).sum().item(), changed.any(0).sum().item()
        sides.update((height, width))
        assert targets[i, labels[i]] == pytest.approx(1 - height * width / 40 ** 2, abs=1e-6)
    assert min(sides) == 10 and max(sides) == 19  # [int(40 * 0.25), int(40 * 0.5))


def test_one_augment_per_batch_by_probs_and_none_for_the_rest():
    augments = batch_augments([{"type": "Mixup", "alpha": 1.0}, {"type": "CutMix", "alpha": 1.0}],
                             probs=[0.3, 0.0], seed=0)
    images, labels = batch()
    mixup = plain = 0
    for _ in range(1000):
        mixed, targets = augments(images, labels)
        if torch.equal(targets, F.one_hot(labels, K).float()):
            plain += 1
            assert torch.equal(mixed, images)
        else:
            mixup += 1
            assert (mixed != images).flatten(1).all(1).any()  # blended everywhere, not a box
    assert abs(mixup / 1000 - 0.3) < 0.05 and mixup + plain == 1000


def test_same_seed_same_batches_and_resume_by_batch_count():
    config = [{"type": "Mixup", "alpha": 0.8}, {"type": "CutMix", "alpha": 1.0}]
    images, labels = batch()
    first, second = batch_augments(config, seed=7), batch_augments(config, seed=7)
    runs = [[first(images, labels) for _ in range(5)], [second(images, labels) for _ in range(5)]]
    for (a, ta), (b, tb) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    # Resumed at update 1 with 3 batches per update: the next batch is the fourth.
    resumed = batch_augments(config, seed=7)
    resumed.on_train_begin(SimpleNamespace(gradient_accumulation_steps=3), TrainerState(global_step=1),
                           TrainerControl())
    assert torch.equal(resumed(images, labels)[1], runs[0][3][1])
    other_seed = batch_augments(config, seed=8)
    other_rank = batch_augments(config, seed=7, rank=1)
    for augments in (other_seed, other_rank):
        draws = [augments(images, labels)[1] for _ in range(5)]
        assert any(not torch.equal(d, t) for d, (_, t) in zip(draws, runs[0]))


def test_model_loss_on_mixed_targets_smooths_the_one_hots_before_mixing():
    eps, lam = 0.1, 0.3
    logits = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(N)
    index = torch.roll(torch.arange(N), 1)
    one_hot = F.one_hot(labels, K).float()
    smoothed = one_hot * (1 - eps) + eps / K  # mmpretrain LabelSmoothLoss, mode "original"
    mixed_smoothed = lam * smoothed + (1 - lam) * smoothed[index]
    expected = -(mixed_smoothed * logits.log_softmax(-1)).sum(-1).mean()
    config = FinetuneResNetConfig(depth=18, num_labels=K, label_smoothing=eps,
                                  problem_type="single_label_classification")
    loss = classification_loss(logits, lam * one_hot + (1 - lam) * one_hot[index], config)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("augments, probs, key", [
    ([{"type": "Mixup", "alpha": 0}], None, "model.train_cfg.augments.0.alpha"),
    ([{"type": "Mixup"}], None, "model.train_cfg.augments.0.alpha"),
    ([{"type": "Mixup", "alpha": 1.0}, {"type": "CutMix", "alpha": "1"}], None,
     "model.train_cfg.augments.1.alpha"),
    ([{"type": "MixUp", "alpha": 1.0}], None, "model.train_cfg.augments.0.type"),
    ([{"type": "CutMix", "alpha": 1.0, "minmax": [0.2, 0.8]}], None,
     "model.train_cfg.augments.0.minmax"),
    ([{"type": "CutMix", "alpha": 1.0, "cutmix_minmax": [0.8, 0.2]}], None,
     "model.train_cfg.augments.0.cutmix_minmax"),
    ([{"type": "Mixup", "alpha": 1.0}, {"type": "CutMix", "alpha": 1.0}], [0.7, 0.5],
     "model.train_cfg.probs"),
    ([{"type": "Mixup", "alpha": 1.0}], [0.5, 0.5], "model.train_cfg.probs"),
    ([], 0.5, "model.train_cfg.probs"),
    ([5], None, "model.train_cfg.augments.0"),
])
def test_invalid_augments_name_the_key(augments, probs, key):
    with pytest.raises(RecipeError) as error:
        config_from_dict(recipe(augments, probs))
    message = str(error.value)
    assert message.startswith(f"recipe: {key}:") and "\n" not in message


def test_batch_augments_need_a_single_label_head():
    with pytest.raises(RecipeError, match=r"^recipe: model\.train_cfg\.augments: Mixup / CutMix need a single"):
        config_from_dict({**recipe([{"type": "Mixup", "alpha": 1.0}],
                                   head={"type": "MultiLabelLinearClsHead", "num_classes": K}),
                          "val_evaluator": {"type": "MultiLabelMetric"},
                          "test_evaluator": {"type": "MultiLabelMetric"}})
