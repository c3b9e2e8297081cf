"""Shared fixtures: a tiny random GPT-2 saved as a Hugging Face checkpoint, exported, and loaded."""
from __future__ import annotations

import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from lmgraph.checkpoint import random_weights, save_hf  # noqa: E402
from lmgraph.config import ModelConfig  # noqa: E402
from lmgraph.tokenizer import default_vocab_dir  # noqa: E402

# Small but real: the full GPT-2 vocabulary, 3 layers, 4 heads. A larger init std than GPT-2's 0.02 makes the
# random model's distributions peaked, so greedy choices are not near-ties that float rounding could flip.
TINY = ModelConfig(n_ctx=128, n_embd=64, n_head=4, n_layer=3)
TINY_STD = 0.2


def write_hf_checkpoint(directory, cfg=TINY, weights=None) -> None:
    save_hf(directory, cfg, weights if weights is not None else random_weights(cfg, seed=1, std=TINY_STD))
    vocab = default_vocab_dir()  # HF's names for the same files
    shutil.copyfile(vocab / "encoder.json", directory / "vocab.json")
    shutil.copyfile(vocab / "vocab.bpe", directory / "merges.txt")


@pytest.fixture(scope="session")
def tiny_weights():
    return random_weights(TINY, seed=1, std=TINY_STD)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, tiny_weights):
    d = tmp_path_factory.mktemp("hf")
    write_hf_checkpoint(d, TINY, tiny_weights)
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, hf_dir):
    from pipeline.export import main

    out = tmp_path_factory.mktemp("model")
    assert main(["--checkpoint", str(hf_dir), "--output", str(out), "--name", "tiny"]) == 0
    return out


@pytest.fixture(scope="session")
def model(model_dir):
    """float32: the precision compared with transformers' float32 exactly."""
    from lmgraph.loader import GenerationModel

    m = GenerationModel(model_dir, precision="float32", intra_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def bf16_model(model_dir):
    """bfloat16: what "auto" picks on CPUs with AMX or AVX512-BF16 (and, run here, tested on any CPU)."""
    from lmgraph.loader import GenerationModel

    m = GenerationModel(model_dir, precision="bfloat16", intra_threads=2)
    yield m
    m.close()


@pytest.fixture(scope="session")
def engines(model, bf16_model):
    """The engine in each precision the pipeline may pick by default, to compare its rows (`precision` column)."""
    return {"float32": model, "bfloat16": bf16_model}


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    import torch  # the test extra installs the reference: a missing one is a failure, not a skip
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
