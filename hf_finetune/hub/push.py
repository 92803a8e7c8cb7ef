"""Push a work dir (or a checkpoint during training) to a Hub repo with huggingface_hub.

One commit holds the final model files, the card, the figures and (optionally) the native
transformers export under `native/`. The endpoint is huggingface_hub's (HF_ENDPOINT, or the
`endpoint` argument for a company mirror / self-hosted hub). Any failure becomes a HubError
whose message names the cause, says the local outputs are intact and gives the command to
retry; the token never appears in a message, a log line or an uploaded file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import tempfile

from hf_finetune.errors import CheckpointError, UserError
from hf_finetune.hub.card import CARD_FILE, NATIVE_SUBFOLDER, is_generated_card, write_model_card
from hf_finetune.hub.export import check_work_dir, export_transformers, is_resnet_work_dir
from hf_finetune.hub.processor import PROCESSOR_FILE, read_json, saved_config, write_image_processor_config

logger = logging.getLogger("hf_finetune.hub")

# The final model and its documentation; never checkpoint-*/ folders or training_args.bin
# (a pickled TrainingArguments, which holds hub_token).
UPLOAD_SUFFIXES = (".safetensors", ".json", ".py", ".png")
UPLOAD_NAMES = (CARD_FILE,)
# An unreachable or hung Hub must fail within ~30 s, not hang: huggingface_hub's client has
# no timeout. The first request (create_repo) is small, so it gets the short limit; uploads
# get a longer one per network read / write (not for the whole transfer).
CONNECT_TIMEOUT_S = 10.0
FIRST_CONTACT_TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 120.0
DEFAULT_COMMIT_MESSAGE = "Upload model fine-tuned with hf_finetune"


class HubError(UserError):
    """The Hub cannot be reached or refused the push. Local outputs are untouched."""

    exit_code = 1


def retry_command(work_dir, repo_id, *, private=False, include_native=True, endpoint=None) -> str:
    words = ["hf-finetune", "push", str(work_dir), repo_id]
    if private:
        words.append("--private")
    if not include_native:
        words.append("--no-native")
    if endpoint:
        words += ["--endpoint", endpoint]
    return " ".join(shlex.quote(word) for word in words)


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else HF_TOKEN, else the one saved by `hf auth login`."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def work_dir_files(work_dir: str) -> dict[str, str]:
    """{path_in_repo: local path} of the work dir's final model files (top level only)."""
    files = {}
    for name in sorted(os.listdir(work_dir)):
        path = os.path.join(work_dir, name)
        if os.path.isfile(path) and (name.endswith(UPLOAD_SUFFIXES) or name in UPLOAD_NAMES):
            files[name] = path
    return files


def prepare_work_dir(work_dir: str, *, repo_id: str | None = None, native_subfolder: str | None = None) -> None:
    """Make sure the work dir has preprocessor_config.json and its model card.

    A card this package generated is refreshed (for the repo id / native export links); a
    card without the generated marker is the user's and is kept as is.
    """
    if not os.path.exists(os.path.join(work_dir, PROCESSOR_FILE)):
        if not is_resnet_work_dir(work_dir):  # a Hub model's comes from its own image processor
            raise CheckpointError(f"work dir {work_dir!r} has no {PROCESSOR_FILE} (written when training ends), "
                                  "so the preprocessing the model expects is unknown")
        write_image_processor_config(work_dir)
    card = os.path.join(work_dir, CARD_FILE)
    if not os.path.exists(card) or is_generated_card(card):
        write_model_card(work_dir, repo_id=repo_id, native_subfolder=native_subfolder)


def _refuse_token_in_files(files: dict[str, str], token: str | None, retry: str) -> None:
    if not token or len(token) < 8:
        return
    needle = token.encode()
    for path_in_repo, path in files.items():
        with open(path, "rb") as handle:
            if needle in handle.read():
                raise HubError(
                    f"{path} contains the Hub token; refusing to upload it. Remove the token from "
                    f"that file, then retry with: {retry}"
                )


# huggingface_hub.utils re-exports the HTTP client huggingface_hub is built on (httpx from 1.31,
# httpx2 from 2.0): the timeout and the transport errors below come from there.
@contextlib.contextmanager
def bounded_timeouts(seconds: float):
    """Give huggingface_hub's shared HTTP client a connect timeout and a read / write timeout."""
    from huggingface_hub.utils import get_session, httpx

    client = get_session()
    previous = client.timeout
    client.timeout = httpx.Timeout(seconds, connect=CONNECT_TIMEOUT_S, pool=CONNECT_TIMEOUT_S)
    try:
        yield
    finally:
        client.timeout = previous


def _exception_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe_failure(exc: BaseException, *, endpoint: str, repo_id: str, token: str | None) -> str:
    """One sentence saying why a Hub call failed."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx

    for error in _exception_chain(exc):
        if isinstance(error, OfflineModeIsEnabled):
            return OFFLINE_REASON
        if isinstance(error, HfHubHTTPError) and error.response is not None:
            status = error.response.status_code
            if status == 401:
                if not token:
                    return ("no Hub token found (401 Unauthorized): set HF_TOKEN, run `hf auth login`, "
                            "or pass --token")
                return ("the Hub rejected the token (401 Unauthorized): set a valid write token in HF_TOKEN, "
                        "run `hf auth login`, or pass --token")
            if status == 403:
                return f"the token may not write to {repo_id} (403 Forbidden): use a token with write access"
            if status == 404 and error.response.request.url.path.endswith("/api/repos/create"):
                return f"{endpoint} does not answer like a Hub (404 on /api/repos/create): check HF_ENDPOINT"
            if status == 404:
                return f"repository {repo_id} was not found or is not writable with this token (404)"
            if status >= 500:
                return f"the Hub had a server error ({status} {error.response.reason_phrase}); try again later"
            detail = error.server_message or error.response.reason_phrase
            return f"the Hub refused the request ({status}: {detail})"
        if isinstance(error, httpx.ConnectTimeout):
            return f"no connection to {endpoint} within {CONNECT_TIMEOUT_S:.0f} s (network down or host unreachable)"
        if isinstance(error, httpx.TimeoutException):
            return f"{endpoint} stopped answering ({error.__class__.__name__})"
        if isinstance(error, (httpx.TransportError, ConnectionError)):
            return f"cannot reach {endpoint} ({error.__class__.__name__}: {error})"
        if isinstance(error, ValueError) and "metadata in README.md" in str(error):
            return str(error).replace("\n", " ")
    return f"{exc.__class__.__name__}: {exc}"


OFFLINE_REASON = "offline mode is on (HF_HUB_OFFLINE=1); unset it to push"


def push_failure(reason: str, *, source: str, repo_id: str, endpoint: str, retry: str, token: str | None) -> HubError:
    return HubError(_scrub(
        f"could not push {source} to {repo_id} on {endpoint}: {reason}. The local outputs in "
        f"{source} are intact; push them later with:\n  {retry}",
        token,
    ))


def upload_files(
    repo_id: str,
    files: dict[str, str],
    *,
    token: str | None,
    private: bool | None,
    endpoint: str | None,
    commit_message: str,
    retry: str,
    source: str,
) -> str:
    """Create the repo if needed and commit `files` ({path_in_repo: local path}); returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    api = HfApi(endpoint=endpoint, token=token or False)
    endpoint = api.endpoint

    def failure(reason: str) -> HubError:
        return push_failure(reason, source=source, repo_id=repo_id, endpoint=endpoint, retry=retry, token=token)

    if constants.is_offline_mode():
        raise failure(OFFLINE_REASON)
    _refuse_token_in_files(files, token, retry)
    logger.info("pushing %d files from %s to %s/%s", len(files), source, endpoint, repo_id)
    try:
        with bounded_timeouts(FIRST_CONTACT_TIMEOUT_S):
            api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        with bounded_timeouts(TRANSFER_TIMEOUT_S):
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in files.items()]
            info = api.create_commit(repo_id, operations, commit_message=commit_message)
    except Exception as exc:  # every failure becomes one clear message; the token is scrubbed
        raise failure(describe_failure(exc, endpoint=endpoint, repo_id=repo_id, token=token)) from None
    url = getattr(info, "commit_url", None) or f"{endpoint}/{repo_id}"
    logger.info("pushed %s to %s/%s (%s)", source, endpoint, repo_id, url)
    return url


def push_work_dir(
    work_dir: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    include_native: bool = True,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """Push a finished work dir to REPO_ID; returns the commit URL.

    Uploads the final model (model.safetensors, config.json with auto_map, the two model
    .py files), preprocessor_config.json, recipe.json, all_results.json, trainer_state.json,
    the card and its PNGs; with include_native, the ResNetForImageClassification export
    under native/ (a Hub model's work dir is a plain transformers model already: no native/).
    Checkpoints and training_args.bin stay local.
    """
    work_dir = str(work_dir)
    check_work_dir(work_dir)
    retry = retry_command(work_dir, repo_id, private=private, include_native=include_native, endpoint=endpoint)
    native = include_native and is_resnet_work_dir(work_dir)
    prepare_work_dir(work_dir, repo_id=repo_id, native_subfolder=NATIVE_SUBFOLDER if native else None)
    token = resolve_token(token)
    files = work_dir_files(work_dir)

    from huggingface_hub import constants

    if constants.is_offline_mode():  # fail before the (slower) export
        raise push_failure(OFFLINE_REASON, source=work_dir, repo_id=repo_id, token=token, retry=retry,
                           endpoint=(endpoint or constants.ENDPOINT).rstrip("/"))
    with tempfile.TemporaryDirectory(prefix="hf_finetune_native_") as native_dir:
        if native:
            export_transformers(work_dir, native_dir)
            for name in sorted(os.listdir(native_dir)):
                files[f"{NATIVE_SUBFOLDER}/{name}"] = os.path.join(native_dir, name)
        return upload_files(repo_id, files, token=token, private=private, endpoint=endpoint,
                            commit_message=commit_message, retry=retry, source=work_dir)


# hub_strategy -> the folder in the repo that receives the whole checkpoint (as the Trainer names it).
CHECKPOINT_FOLDERS = {"checkpoint": "last-checkpoint", "all_checkpoints": None}  # None: its own name


def push_checkpoint(
    checkpoint_dir: str,
    repo_id: str,
    *,
    work_dir: str,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    strategy: str = "every_save",
    commit_message: str | None = None,
) -> str:
    """Push a Trainer checkpoint's model (+ the work dir's recipe) to the repo root, in one commit.

    strategy "checkpoint" also uploads the whole checkpoint under last-checkpoint/ (for
    resuming elsewhere), "all_checkpoints" under its own name (checkpoint-N/); both leave
    out training_args.bin.
    """
    token = resolve_token(token)
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    files = {
        file: os.path.join(checkpoint_dir, file)
        for file in sorted(os.listdir(checkpoint_dir))
        if file.endswith((".safetensors", ".py")) or file in ("config.json", "trainer_state.json")
    }
    recipe = os.path.join(work_dir, "recipe.json")
    if os.path.exists(recipe):
        files["recipe.json"] = recipe
    if strategy in CHECKPOINT_FOLDERS:
        folder = CHECKPOINT_FOLDERS[strategy] or name
        for file in sorted(os.listdir(checkpoint_dir)):
            path = os.path.join(checkpoint_dir, file)
            if os.path.isfile(path) and file != "training_args.bin":
                files[f"{folder}/{file}"] = path
    retry = retry_command(work_dir, repo_id, private=private, endpoint=endpoint)
    with tempfile.TemporaryDirectory(prefix="hf_finetune_push_") as tmp:
        config = read_json(files["config.json"]) if "config.json" in files else {}
        files[PROCESSOR_FILE] = write_image_processor_config(tmp, config, saved_config(work_dir))
        return upload_files(repo_id, files, token=token, private=private, endpoint=endpoint,
                            commit_message=commit_message or f"Training in progress: {name}",
                            retry=retry, source=checkpoint_dir)
