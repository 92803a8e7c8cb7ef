"""Share a finished work dir: image processor config, model card, native export, Hub push.

    write_image_processor_config(dir, config=None, recipe=None) -> path
    write_model_card(work_dir, *, repo_id=None, native_subfolder=None) -> path
    export_transformers(work_dir, out_dir) -> out_dir
    push_work_dir(work_dir, repo_id, *, token=None, private=False, endpoint=None,
                  include_native=True, commit_message=...) -> commit URL
    PushOnSaveCallback(repo_id, token=None, private=False, *, strategy="every_save", endpoint=None,
                       always_push=False)   (a TrainerCallback: pushes each save in the background)
    main(argv) -> exit code      (`hf-finetune push ...` / `hf-finetune export ...`)

Importing this package is cheap: torch / transformers / matplotlib load on first use.
"""

from hf_finetune.hub.card import write_model_card
from hf_finetune.hub.cli import main
from hf_finetune.hub.export import export_transformers
from hf_finetune.hub.processor import write_image_processor_config
from hf_finetune.hub.push import HubError, prepare_work_dir, push_checkpoint, push_work_dir

__all__ = [
    "HubError",
    "PushOnSaveCallback",
    "export_transformers",
    "main",
    "prepare_work_dir",
    "push_checkpoint",
    "push_work_dir",
    "write_image_processor_config",
    "write_model_card",
]


def __getattr__(name):
    # The callback subclasses transformers' TrainerCallback: import transformers only when asked.
    if name == "PushOnSaveCallback":
        from hf_finetune.hub.callback import PushOnSaveCallback

        return PushOnSaveCallback
    raise AttributeError(f"module 'hf_finetune.hub' has no attribute {name!r}")
