"""`hf-finetune predict MODEL INPUTS...`: top-k labels for one's own images.

MODEL is a work dir, a checkpoint-N folder inside one, a folder written by
`hf-finetune export ... --format transformers`, or a Hub id. A work dir or checkpoint is
fed exactly as its test split was during evaluation: the recipe's test pipeline on
uint8 images, normalised by the model itself on the device. An exported folder is fed
through its image processor.

    rows = predict("work_dirs/cifar10", ["photos/"], topk=3)
    # [{"file": "photos/cat.png", "predictions": [("cat", 0.91), ...], "error": None}, ...]

A multi-label model (config problem_type "multi_label_classification") scores each label on
its own (sigmoid), and its rows also hold "predicted": every label the model predicts, by the
rule its evaluation used (the recipe's threshold or top-k; without a recipe, a score of at
least config.MULTI_LABEL_THR).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

import numpy as np
import torch

from hf_finetune.config import MULTI_LABEL_THR, read_config
from hf_finetune.data.decode import LazyImage, decode_image
from hf_finetune.data.imagefolder import ACCEPTED_IMAGES, IMAGE_EXTENSIONS
from hf_finetune.data.transforms import BatchTransform
from hf_finetune.devices import default_device
from hf_finetune.errors import CheckpointError, DataError, UserError

RECIPE_FILE = "recipe.json"
PROCESSOR_FILE = "preprocessor_config.json"
# What predict reads from a Hub repo (at its root): the weights, and how to preprocess.
HUB_REQUIRED = ("config.json", "model.safetensors")
HUB_OPTIONAL = (RECIPE_FILE, PROCESSOR_FILE)


# ------------------------------------------------------------------ model
def _saved_recipe(model_dir: str):
    """The Config the model was trained with, or None when no recipe is saved.

    A work dir holds recipe.json; a checkpoint-N folder's parent does.
    """
    for folder in (model_dir, os.path.dirname(os.path.abspath(model_dir))):
        path = os.path.join(folder, RECIPE_FILE)
        if os.path.isfile(path):
            return read_config(path)
    return None


def _eval_steps(cfg):
    """The pipeline steps the model was evaluated with (None: no test or val section)."""
    section = cfg.test_dataloader or cfg.val_dataloader
    return [step.op for step in section.dataset.pipeline] if section else None


def _download(repo_id: str) -> str:
    """The local snapshot folder holding the repo's model files (only those predict reads)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    folder = None
    for name in HUB_REQUIRED + HUB_OPTIONAL:
        try:
            folder = os.path.dirname(hf_hub_download(repo_id, name))
        except RemoteEntryNotFoundError:
            if name in HUB_REQUIRED:
                raise CheckpointError(f"Hub repo {repo_id!r} has no {name} at its root: not a model predict can "
                                      f"load") from None
        except Exception as exc:  # offline, unknown repo, no access: all end the command the same way
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot download {repo_id!r} from the Hub ({type(exc).__name__}: {reason}); "
                                  f"check the id and your connection, or pass a local folder") from None
    return folder


class Classifier:
    """A loaded model and the preprocessing it was evaluated with: uint8 images -> probabilities.

    rule: (thr, topk), when a multi-label model predicts a label (Config.multi_label_decision)."""

    def __init__(self, model, *, steps=None, processor=None, device=None, rule=None):
        try:
            self.device = torch.device(device or default_device())
            self.model = model.to(self.device).eval()
        except (RuntimeError, AssertionError) as exc:  # unknown name, or a device this torch lacks
            raise UserError(f"--device {device}: not usable here ({str(exc).splitlines()[0]})") from None
        self.processor = processor
        # The evaluation transform itself: same decoding (reduced-scale JPEG where it applies),
        # same steps, one batch per call.
        self.transform = BatchTransform(steps, image_column="img", label_column="label",
                                        source="predict") if steps else None
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.multi_label = model.config.problem_type == "multi_label_classification"
        self.rule = (rule or (MULTI_LABEL_THR, None)) if self.multi_label else None

    @classmethod
    def load(cls, source: str, device=None) -> "Classifier":
        from hf_finetune.hub.card import is_hub_id

        if not os.path.exists(source):
            if not is_hub_id(source):
                raise CheckpointError(f"model {source!r}: no such folder, and not a Hub id (org/name)")
            source = _download(source)
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise CheckpointError(f"model {source!r}: no config.json there; expected a work dir, a checkpoint-N "
                                  f"folder, an exported folder or a Hub id")
        cfg = _saved_recipe(source)
        steps = _eval_steps(cfg) if cfg is not None else None
        if steps is not None:
            from hf_finetune.hub.export import load_work_dir_model
            from hf_finetune.models import load_saved_model

            # Our ResNet as export loads it; any other classifier (a Hub model's fine-tuning)
            # through transformers, normalised with the recipe's recorded mean / std.
            model = load_work_dir_model(source) if cfg.model.type == "ImageClassifier" else \
                load_saved_model(source, f"model {source!r}", preprocessor_cfg=cfg.data_preprocessor)
            return cls(model, steps=steps, device=device, rule=cfg.multi_label_decision())
        if not os.path.isfile(os.path.join(source, PROCESSOR_FILE)):
            raise CheckpointError(f"model {source!r}: neither {RECIPE_FILE} (here or in the parent folder) nor "
                                  f"{PROCESSOR_FILE}, so the preprocessing it expects is unknown")
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            model = AutoModelForImageClassification.from_pretrained(source)
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the model in {source!r}: {exc}") from None
        return cls(model, processor=processor, device=device,
                   rule=cfg.multi_label_decision() if cfg is not None else None)

    def open(self, path: str):
        """What model_inputs takes for one file: the undecoded image for the evaluation
        transform (it decodes only what its steps need), else the decoded array."""
        with open(path, "rb") as handle:
            data = handle.read()
        if self.transform is None:
            return _decode(data)
        from PIL import UnidentifiedImageError

        try:
            return LazyImage({"bytes": data, "path": path})
        except UnidentifiedImageError:  # PIL names its BytesIO here, not the file
            raise ValueError("not an image format PIL can read") from None

    def model_inputs(self, images: list) -> torch.Tensor:
        """pixel_values [N, 3, H, W] for the model."""
        if self.processor is not None:
            return self.processor(images, return_tensors="pt")["pixel_values"]
        # NHWC -> the [N, 3, H, W] channels_last view PackClsInputs hands the model.
        return self.transform.run_steps(images).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def probabilities(self, images: list[np.ndarray]) -> torch.Tensor:
        """[len(images), num_labels] scores, in the order of `images`: softmax over the labels,
        or for a multi-label model each label's own sigmoid."""
        logits = self.model(pixel_values=self.model_inputs(images).to(self.device, non_blocking=True)).logits
        logits = logits.float()
        return (logits.sigmoid() if self.multi_label else logits.softmax(-1)).cpu()

    def predicted(self, scores: torch.Tensor) -> list[str]:
        """The labels a multi-label model predicts from one image's scores: its k best, or
        those scoring at least thr (metrics/multilabel's rule; that evaluate script is loaded
        by path, not imported)."""
        thr, topk = self.rule
        chosen = set(scores.argsort(descending=True, stable=True)[:topk].tolist()) if topk else \
            {i for i, score in enumerate(scores.tolist()) if score >= thr}
        return [label for i, label in enumerate(self.labels) if i in chosen]


# ------------------------------------------------------------------ inputs
def find_images(inputs) -> list[str]:
    """Files as given, image files under folders (recursive, sorted), glob matches; in order, once each."""
    found = []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            found += sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
        elif os.path.exists(item):
            found.append(item)
        elif glob.has_magic(item):
            found += sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        else:
            raise DataError(f"input {item!r}: no such file or folder, and no glob pattern")
    found = list(dict.fromkeys(found))
    if not found:
        raise DataError(f"no image files in {' '.join(map(str, inputs))} "
                        f"(looked for {ACCEPTED_IMAGES})")
    return found


def _decode(data: bytes) -> np.ndarray:
    from PIL import UnidentifiedImageError

    try:
        return decode_image(data)
    except UnidentifiedImageError:  # PIL names its BytesIO here, not the file
        raise ValueError("not an image format PIL can read") from None


# ------------------------------------------------------------------ predict
def predict(model, inputs, topk: int = 5, batch_size: int = 32, device=None, progress: bool = False) -> list[dict]:
    """Top-k predictions for image files, folders and globs.

    model: a path or Hub id (see the module docstring), or a loaded Classifier.
    Returns one row per file: {"file", "predictions": [(label, probability), ...], "error"};
    an unreadable file has no predictions and its error message. A multi-label model's rows
    also hold "predicted": the labels it predicts (in label order, top-k or not).
    """
    from tqdm.auto import tqdm

    classifier = model if isinstance(model, Classifier) else Classifier.load(str(model), device=device)
    topk = min(int(topk), len(classifier.labels))
    files = find_images(inputs)
    rows = []
    with tqdm(total=len(files), unit="img", disable=not progress or len(files) <= batch_size) as bar:
        for start in range(0, len(files), batch_size):
            images, readable = [], []
            for path in files[start:start + batch_size]:
                try:
                    images.append(classifier.open(path))
                    readable.append(path)
                except Exception as exc:
                    rows.append({"file": path, "predictions": [], "error": f"cannot read the image: {exc}"})
            for path, probabilities in _scored(classifier, readable, images, rows):
                scores, indices = probabilities.topk(topk)
                predictions = [(classifier.labels[i], s) for i, s in zip(indices.tolist(), scores.tolist())]
                row = {"file": path, "predictions": predictions, "error": None}
                if classifier.multi_label:
                    row["predicted"] = classifier.predicted(probabilities)
                rows.append(row)
            bar.update(len(files[start:start + batch_size]))
    order = {path: i for i, path in enumerate(files)}
    return sorted(rows, key=lambda row: order[row["file"]])


def _scored(classifier, paths, images, rows):
    """(path, probabilities) per image, the batch at once; when the batch fails (an image
    that only fails when decoded, sizes a pipeline does not unify), each image alone, a
    failing one reported on its row."""
    if not images:
        return []
    try:
        return list(zip(paths, classifier.probabilities(images)))
    except Exception:
        scored = []
        for path, image in zip(paths, images):
            try:
                scored.append((path, classifier.probabilities([image])[0]))
            except Exception as exc:
                rows.append({"file": path, "predictions": [], "error": f"cannot read the image: {exc}"})
        return scored


# ------------------------------------------------------------------ output
def format_table(rows: list[dict], rule=None) -> str:
    """file | top-1 | top-2 ... with scores in percent; an unreadable file says why on its line.
    A label a multi-label model predicts is marked *; rule: its (thr, topk), said below the table."""
    topk = max((len(row["predictions"]) for row in rows), default=0)
    header = ["file"] + [f"top-{k}" for k in range(1, topk + 1)]
    cells = [[row["file"]] + [f"{label} ({100 * score:.1f}%)" + (" *" if label in row.get("predicted", ()) else "")
                              for label, score in row["predictions"]]
             for row in rows]
    widths = [max(len(header[c]), *(len(r[c]) for r in cells if c < len(r))) for c in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for row, cell in zip(rows, cells):
        if row["error"]:
            lines.append(f"{row['file'].ljust(widths[0])}  ERROR: {row['error']}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip())
    if any("predicted" in row for row in rows):
        thr, k = rule or (None, None)
        how = f"among the {k} best labels" if k else f"score >= {thr}" if thr is not None else "by its rule"
        lines.append(f"* predicted by the multi-label model ({how})")
    return "\n".join(lines)


def write_rows(rows: list[dict], path: str) -> None:
    """CSV (file, label_1, score_1, ..., error) or JSON (the rows), chosen by the extension."""
    if path.lower().endswith(".json"):
        content = [{"file": row["file"], "error": row["error"],
                    "predictions": [{"label": label, "score": score} for label, score in row["predictions"]],
                    **({"predicted": row["predicted"]} if "predicted" in row else {})}
                   for row in rows]
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2)
        return
    topk = max((len(row["predictions"]) for row in rows), default=0)
    multi_label = any("predicted" in row for row in rows)  # + the labels it predicts, ";"-separated
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file"] + [f"{kind}_{k}" for k in range(1, topk + 1) for kind in ("label", "score")]
                        + ["predicted"] * multi_label + ["error"])
        for row in rows:
            flat = [value for label, score in row["predictions"] for value in (label, f"{score:.6f}")]
            writer.writerow([row["file"]] + flat + [""] * (2 * topk - len(flat))
                            + [";".join(row.get("predicted", ()))] * multi_label + [row["error"] or ""])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-finetune predict",
                                     description="Top-k labels for image files, folders (recursive) and globs.")
    parser.add_argument("model", help="a work dir, a checkpoint-N folder, an exported folder, or a Hub id")
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--topk", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the first available)")
    parser.add_argument("--out", help="also write the predictions to FILE.csv or FILE.json")
    return parser


def _quiet_library_bars() -> None:
    """No download / weight-loading bars when the output goes to a file: they would fill it with '\\r'."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bars()
    disable_progress_bar()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stdout.isatty():
        _quiet_library_bars()
    try:
        if args.topk < 1 or args.batch_size < 1:
            raise UserError(f"--topk {args.topk} / --batch-size {args.batch_size}: both must be >= 1")
        if args.out and not args.out.lower().endswith((".csv", ".json")):
            raise UserError(f"--out {args.out}: expected a .csv or .json file name")
        classifier = Classifier.load(args.model, device=args.device)
        rows = predict(classifier, args.inputs, topk=args.topk, batch_size=args.batch_size,
                       progress=sys.stdout.isatty())
        print(format_table(rows, classifier.rule))
        if args.out:
            write_rows(rows, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    failed = sum(1 for row in rows if row["error"])
    if failed:
        print(f"{failed} of {len(rows)} file(s) could not be read", file=sys.stderr)
    return 0 if failed < len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
