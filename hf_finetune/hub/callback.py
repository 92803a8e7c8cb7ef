"""PushOnSaveCallback: push each saved checkpoint in the background (hub_strategy every_save,
checkpoint, all_checkpoints), as transformers' Trainer does, with HfApi.run_as_future.

Why not TrainingArguments(push_to_hub=True): the Trainer uploads the whole work dir
(training_args.bin, a pickle holding hub_token, included), copies each checkpoint's model into
the work dir during training, and drops a failed push without a word. Here each push is
push_checkpoint's: its allow-list, its token scan, one commit.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import wait

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_finetune.hub.push import CHECKPOINT_FOLDERS, push_checkpoint

logger = logging.getLogger("hf_finetune.hub")

STRATEGIES = ("every_save", *CHECKPOINT_FOLDERS)


class PushOnSaveCallback(TrainerCallback):
    """After each checkpoint save, push it to REPO_ID without stopping training (main process only).

    Pushes run one at a time on HfApi's background thread. Like the Trainer (hub_always_push
    false), a save made while the previous push still runs is not pushed, unless always_push
    queues it. Training waits for the last push when it ends, so the final push comes after
    it. A failed push is one warning line: training goes on, and the final push (or
    `hf-finetune push WORK_DIR REPO_ID`) uploads the finished model.
    """

    def __init__(self, repo_id: str, token: str | None = None, private: bool = False, *,
                 strategy: str = "every_save", endpoint: str | None = None, always_push: bool = False):
        from huggingface_hub import HfApi

        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: expected one of {list(STRATEGIES)}")
        self.repo_id = repo_id
        self._token = token  # kept out of repr / logs
        self.private = private
        self.strategy = strategy
        self.endpoint = endpoint
        self.always_push = always_push
        self._api = HfApi(endpoint=endpoint)  # its run_as_future queue runs the pushes in order
        self._pushes = []  # futures of the pushes not yet finished

    def __repr__(self):
        return f"PushOnSaveCallback(repo_id={self.repo_id!r}, strategy={self.strategy!r})"

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):
            checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if checkpoint is None:
            logger.warning("push to %s skipped: no checkpoint found in %s", self.repo_id, args.output_dir)
            return
        self._pushes = [push for push in self._pushes if not push.done()]
        if self._pushes and not self.always_push:
            logger.info("push of %s to %s skipped: the previous push is still running",
                        os.path.basename(checkpoint), self.repo_id)
            return
        self._pushes.append(self._api.run_as_future(self._push, checkpoint, args.output_dir))

    def on_train_end(self, args, state, control, **kwargs):
        if any(not push.done() for push in self._pushes):
            logger.info("waiting for the checkpoint push to %s to finish", self.repo_id)
        wait(self._pushes)
        self._pushes = []

    def _push(self, checkpoint, work_dir):
        try:
            push_checkpoint(checkpoint, self.repo_id, work_dir=work_dir, token=self._token,
                            private=self.private, endpoint=self.endpoint, strategy=self.strategy)
        except Exception as exc:  # a Hub hiccup must not stop training
            message = str(exc).replace(self._token, "***") if self._token else str(exc)
            logger.warning("push of %s to %s failed; training continues: %s",
                           os.path.basename(checkpoint), self.repo_id, " ".join(message.split()))
