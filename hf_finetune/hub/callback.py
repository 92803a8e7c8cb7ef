"""PushOnSaveCallback: push every saved checkpoint during training (hub_strategy every_save / checkpoint)."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_finetune.hub.push import push_checkpoint

logger = logging.getLogger("hf_finetune.hub")

STRATEGIES = ("every_save", "checkpoint")


class PushOnSaveCallback(TrainerCallback):
    """After each checkpoint save, push its model to REPO_ID (main process only).

    A failed push is a warning: training goes on, and the final push at the end of
    training (or `hf-finetune push WORK_DIR REPO_ID`) uploads the finished model.
    strategy "checkpoint" also uploads the full checkpoint under last-checkpoint/.
    """

    def __init__(self, repo_id: str, token: str | None = None, private: bool = False, *,
                 strategy: str = "every_save", endpoint: str | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: expected one of {list(STRATEGIES)}")
        self.repo_id = repo_id
        self._token = token  # kept out of repr / logs
        self.private = private
        self.strategy = strategy
        self.endpoint = endpoint

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
        try:
            push_checkpoint(checkpoint, self.repo_id, work_dir=args.output_dir, token=self._token,
                            private=self.private, endpoint=self.endpoint, strategy=self.strategy)
        except Exception as exc:  # a Hub hiccup must not stop training
            message = str(exc).replace(self._token, "***") if self._token else str(exc)
            logger.warning("push of %s to %s failed; training continues: %s",
                           os.path.basename(checkpoint), self.repo_id, message)
