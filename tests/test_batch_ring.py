"""Loader workers hand batches over in reused shared-memory slots (hf_finetune.data.ring)."""

import copy
import gc
import multiprocessing
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from hf_finetune.data import build_dataloader, build_datasets
from hf_finetune.data.ring import FREE, RECEIVED, BatchRing, RingBatch, _receive
from hf_finetune.data.transforms import _resize
from test_data_pipeline import TRAIN_PIPELINE, random_images, synthetic_recipe

CROP_LAST = [{"type": "RandomFlip", "prob": 0.5}, {"type": "Resize", "scale": 48}, {"type": "CenterCrop", "crop_size": 40},
             {"type": "PackClsInputs"}]


def _split(pipeline, num_samples=24):
    return build_datasets(synthetic_recipe(pipeline, num_samples=num_samples))["train"]


@pytest.mark.parametrize("pipeline, size", [(TRAIN_PIPELINE, 64), (CROP_LAST, 40)])
def test_slots_give_the_same_batches_as_torchs_transfer(pipeline, size):
    """A final Resize writes into the slot, a final CenterCrop is copied there: either way the
    pixels, labels and memory layout equal torch's usual transfer."""
    ds = _split(pipeline)
    shared = build_dataloader(ds, 8, shuffle=True, num_workers=2, seed=5)
    plain = build_dataloader(ds, 8, shuffle=True, num_workers=2, seed=5, shared_slots=False)
    assert plain.dataset.ring is None
    pairs = list(zip(shared, plain))
    assert len(pairs) == 3
    for a, b in pairs:
        assert shared.dataset.ring.holds(a["pixel_values"])
        assert a["pixel_values"].shape == (8, 3, size, size)
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
        assert a["pixel_values"].stride() == b["pixel_values"].stride()


def test_held_batches_are_never_overwritten():
    """Holding a whole epoch: once every slot is taken, batches travel torch's way; none is
    overwritten. Dropping them frees the slots for the next epoch."""
    ds = _split(TRAIN_PIPELINE, num_samples=96)
    loader = build_dataloader(ds, 4, shuffle=True, num_workers=2, prefetch_factor=1, persistent_workers=True, seed=1)
    ring = loader.dataset.ring
    slots = len(ring.state)
    assert slots == 2 * 1 + 4
    held = list(loader)
    reference = list(build_dataloader(ds, 4, shuffle=True, num_workers=2, prefetch_factor=1, seed=1,
                                      shared_slots=False))
    assert len(held) == len(reference) == 24
    in_ring = [ring.holds(b["pixel_values"]) for b in held]
    assert 0 < sum(in_ring) <= slots and not all(in_ring)
    for a, b in zip(held, reference):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    del held, a, b
    gc.collect()
    assert (ring.state == FREE).all()
    assert all(ring.holds(b["pixel_values"]) for b in loader)  # one batch held at a time


def test_a_slot_is_free_only_when_its_last_view_is_gone():
    loader = build_dataloader(_split(TRAIN_PIPELINE), 8, num_workers=1, seed=0)
    ring = loader.dataset.ring
    batches = iter(loader)
    batch = next(batches)
    slot = (batch["pixel_values"].data_ptr() - ring.memory.ctypes.data) // ring.slot_bytes
    first_image = batch["pixel_values"][0]
    expected = first_image.clone()
    del batch
    gc.collect()
    assert ring.state[slot] == RECEIVED  # the view keeps the slot
    rest = list(batches)  # the worker fills other slots meanwhile
    assert len(rest) == 2 and torch.equal(first_image, expected)
    del first_image
    assert ring.state[slot] == FREE


def _claim_and_die(ring):
    ring.lend((1, 4, 4, 3))
    ring._lock()  # and die holding the slots' lock: the kernel releases it
    os._exit(0)


@pytest.mark.timeout(60)
def test_claims_of_dead_workers_are_reclaimed_and_stale_batches_refused():
    ring = BatchRing(slots=1, slot_bytes=64)
    child = multiprocessing.get_context("fork").Process(target=_claim_and_die, args=(ring,))
    child.start()
    child.join()
    dead_claim = int(ring.state[0])
    assert dead_claim >> 32 == child.pid
    slot = ring.lend((1, 4, 4, 3))  # the dead worker's slot is taken again
    assert ring.lent[0] == 0 and int(ring.state[0]) >> 32 == os.getpid() and slot.shape == (1, 4, 4, 3)
    ring.give_back()
    assert ring.state[0] == FREE
    # A batch whose slot was claimed again before it arrived is refused, not read.
    failed = _receive(ring.key, 0, dead_claim, (1, 4, 4, 3), torch.zeros(1, dtype=torch.int64).numpy())
    with pytest.raises(RuntimeError, match="slot 0 of the loader's shared batches was reused before its batch"):
        failed.reraise()


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_spawned_workers_map_the_same_slots(start_method):
    """Workers started by spawn or forkserver (Python 3.14's Linux default) get the ring's file
    descriptors and write into the same slots; the batches equal those of forked workers."""
    ds = _split(TRAIN_PIPELINE)
    forked = list(build_dataloader(ds, 8, shuffle=True, num_workers=1, seed=5))
    parts = build_dataloader(ds, 8, shuffle=True, num_workers=1, seed=5)
    spawned = torch.utils.data.DataLoader(parts.dataset, batch_sampler=parts.batch_sampler,
                                          collate_fn=parts.collate_fn, num_workers=1,
                                          worker_init_fn=parts.worker_init_fn, generator=parts.generator,
                                          multiprocessing_context=start_method)
    batches = list(spawned)
    assert len(batches) == len(forked) == 3
    for a, b in zip(batches, forked):
        assert parts.dataset.ring.holds(a["pixel_values"])
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def test_a_copy_of_the_loaders_dataset_has_no_ring():
    loader = build_dataloader(_split(TRAIN_PIPELINE), 8, num_workers=2)
    assert loader.dataset.ring is not None
    assert pickle.loads(pickle.dumps(loader.dataset)).ring is None
    assert copy.deepcopy(loader.dataset).ring is None


@pytest.mark.parametrize("mode, backend", [("bilinear", "cv2"), ("bilinear", "pillow"), ("bicubic", "cv2"),
                                           ("bicubic", "pillow")])
@pytest.mark.parametrize("size", [(56, 72), (20, 24)])
def test_resize_into_a_given_tensor_equals_interpolate(mode, backend, size):
    images = random_images(4, 32, 40)
    out = torch.full((4, *size, 3), 7, dtype=torch.uint8)
    result = _resize(images, size, mode, backend, out=out)
    assert result is out
    nchw = images.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(nchw, size=size, mode=mode, align_corners=False, antialias=backend == "pillow")
    assert torch.equal(out.permute(0, 3, 1, 2), expected)


@pytest.mark.parametrize("name", ["upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_bicubic2d",
                                  "_upsample_bicubic2d_aa"])
def test_torchs_resize_kernels_with_out_keep_their_signature(name):
    """transforms._resize writes into the slot through torch.ops.aten's `.out` overloads, which
    are not a documented API: this fails when torch changes them."""
    schema = getattr(torch.ops.aten, name).out._schema
    assert [a.name for a in schema.arguments] == ["self", "output_size", "align_corners", "scales_h", "scales_w",
                                                  "out"]
    assert schema.arguments[-1].kwarg_only


class _LostBatch(torch.utils.data.Dataset):
    """A worker's batch whose ring the main process does not know."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return RingBatch("no such ring", 0, 1, (1, 2, 2, 3), torch.zeros(1, dtype=torch.int64).numpy())


@pytest.mark.timeout(60)
def test_a_batch_that_cannot_be_received_is_raised_in_the_training_loop():
    """ring._receive hands a failure to torch's DataLoader as a torch._utils.ExceptionWrapper,
    which torch re-raises in the loop (not in its pin-memory thread, which it would kill). Both
    are torch internals: this fails when torch changes them."""
    loader = torch.utils.data.DataLoader(_LostBatch(), batch_size=None, num_workers=1)
    with pytest.raises(KeyError, match="in the main process, receiving a batch from a DataLoader worker"):
        next(iter(loader))


def _rows(*arrays):
    from hf_finetune.data.decode import encode_ppm

    items = [{"bytes": encode_ppm(a.numpy()), "path": None} for a in arrays]
    return {"img": items, "label": list(range(len(items))), "__row__": list(range(len(items)))}


@pytest.mark.parametrize("first_step", [[], [{"type": "RandomFlip", "prob": 0.0}]])
@pytest.mark.parametrize("sizes", [[(32, 32)] * 3, [(32, 32), (40, 48), (32, 32)]])
def test_every_path_of_the_transform_ends_in_the_lent_slot(first_step, sizes):
    """Photos of one size or several, a Resize that opens the images itself or one after another
    step: the batch a worker builds lies in the lent slot and arrives equal to the batch built
    without one. A slot too small for the batch: it travels as an ordinary batch."""
    from hf_finetune.data.transforms import BatchTransform, build_pipeline

    batch = _rows(*(random_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)))
    steps = build_pipeline(first_step + [{"type": "Resize", "scale": 24}, {"type": "PackClsInputs"}])
    transform = BatchTransform(steps, image_column="img", label_column="label", source="test")
    expected = transform(batch)
    for slot_bytes, fits in ((3 * 24 * 24 * 3, True), (100, False)):
        ring = BatchRing(slots=1, slot_bytes=slot_bytes)
        built = transform(batch, lend=ring.lend)
        sent = ring.send(built)
        ring.give_back()
        assert ring.holds(built["pixel_values"]) == fits
        received = pickle.loads(pickle.dumps(sent))  # what the main process gets
        assert torch.equal(received["pixel_values"], expected["pixel_values"])
        assert torch.equal(received["labels"], expected["labels"])
        assert received["pixel_values"].stride() == expected["pixel_values"].stride()
