"""LLM2Vec text encoder on a tiny random Llama built locally: bidirectional attention, mean pooling over
the text (not the instruction), LoRA merged."""

from __future__ import annotations

import pytest
import torch

from annotate.train.llm2vec import LLM2VecEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaModel

    from annotate.models.tiny import build_tokenizer

    tok = build_tokenizer(False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _encoder(path, **kwargs):
    return LLM2VecEncoder.from_pretrained(str(path), device="cpu", **kwargs)


def test_first_token_sees_later_tokens(tiny_llama):
    """Bidirectional: the first token's state changes when only the last word changes; the same
    decoder run causally (plain transformers) leaves it unchanged."""
    from transformers import AutoModel

    enc = _encoder(tiny_llama)
    texts = ["a red cup on the table", "a red cup on the chair"]
    hidden, batch = enc.hidden_states(texts)
    assert torch.equal(batch["input_ids"][0, :3], batch["input_ids"][1, :3])
    assert not torch.allclose(hidden[0, 0], hidden[1, 0], atol=1e-5)
    causal = AutoModel.from_pretrained(str(tiny_llama)).eval()
    with torch.no_grad():
        h = causal(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(h[0, 0], h[1, 0])


def test_padding_does_not_leak_and_pooling_is_over_the_text(tiny_llama):
    enc = _encoder(tiny_llama, instruction="Retrieve the image region this caption describes:")
    short, long_ = "a dog", "a long caption about a dog that sits on a sofa in the sun"
    alone, padded = enc([short]), enc([short, long_])[:1]
    torch.testing.assert_close(torch.from_numpy(padded), torch.from_numpy(alone), rtol=1e-4, atol=1e-5)
    hidden, batch = enc.hidden_states([short])
    n_instr = int(batch["attention_mask"].sum() - batch["embed_mask"].sum())
    assert n_instr > 5  # the instruction is attended to ...
    want = hidden[0, n_instr:].mean(0)  # ... but only the text's tokens are pooled
    torch.testing.assert_close(torch.from_numpy(alone[0]), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.from_numpy(alone), torch.from_numpy(_encoder(tiny_llama)([short])), atol=1e-5)


def test_lora_adapters_are_merged(tiny_llama, tmp_path):
    """A LoRA adapter (peft layout, non-zero B) merged at load gives the same features as the
    unmerged PeftModel, and leaves no LoRA modules behind."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModel.from_pretrained(str(tiny_llama)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    texts = ["a red cup", "two cats on a mat"]
    merged = _encoder(tiny_llama, lora=[str(tmp_path / "adapter")])
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    base = AutoModel.from_pretrained(str(tiny_llama))
    unmerged = LLM2VecEncoder(PeftModel.from_pretrained(base, str(tmp_path / "adapter")),
                              AutoTokenizer.from_pretrained(str(tiny_llama)), device="cpu")
    torch.testing.assert_close(torch.from_numpy(merged(texts)), torch.from_numpy(unmerged(texts)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(torch.from_numpy(merged(texts)), torch.from_numpy(_encoder(tiny_llama)(texts)), atol=1e-4)


def test_embed_text_config_selects_llm2vec(tiny_llama, tmp_path, tiny_train_cfg):
    """`train.text_encoder_type: llm2vec` is what `annotate embed-text` (and eval) build."""
    from annotate.train.text_cache import make_text_encoder, write_text_cache

    cfg = tiny_train_cfg.model_copy(update={"text_encoder": str(tiny_llama), "text_encoder_type": "llm2vec",
                                            "text_instruction": "Describe:"})
    enc = make_text_encoder(cfg)
    assert isinstance(enc, LLM2VecEncoder) and enc.instruction == "Describe:"
    cache = write_text_cache(["a red cup", "a dog"], enc, tmp_path / "cache")
    assert cache.dim == 32
    unit = torch.nn.functional.normalize(torch.from_numpy(enc(["a dog"])[0]), dim=-1)  # stored as the adaptor reads it
    torch.testing.assert_close(torch.from_numpy(cache.get("a dog")), unit.half().float())
