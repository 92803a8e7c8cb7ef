import os

# Tests that do not exercise a network path must never wait on Hub retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest


@pytest.fixture(autouse=True)
def fresh_pipeline_generator():
    """Each test starts with the pipeline drawing from torch's global RNG: a DataLoader iterated
    in-process by an earlier test leaves its epoch generator installed."""
    from hf_finetune.data.runtime import set_pipeline_generator

    set_pipeline_generator(None)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: thread start-up dominates and is slow on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
