"""Shared fixtures: tiny models and tokenizers built locally in about a second (never downloaded), real data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# One thread: tiny models gain nothing from more, and the suite shares 2 cores with whatever else runs.
torch.set_num_threads(1)

# A small corpus that looks like what the tests feed the models: questions, reasoning, answer lines.
CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:\n"
    "Tom starts with 3 apples. He buys 4 more, so 3 + 4 = 7. The answer is 7.",
    "Question: Which gas do plants take in? (A) oxygen (B) carbon dioxide (C) helium (D) neon\nAnswer:\n"
    "Plants use carbon dioxide for photosynthesis. The answer is (B).",
    "Question: Is the sun a star?\nAnswer:\nThe sun is a star at the centre of our solar system. The answer is yes.",
    "A train travels 60 miles in 2 hours; its speed is 60 / 2 = 30 miles per hour. The answer is 30.",
    "Step 1: 12 - 5 = 7. Step 2: 7 * 3 = 21. Step 3: 21 + 9 = 30. The answer is 30.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) . , ? ! : ; yes no true false",
] * 4


def _bpe_tokenizer(vocab_size: int = 400):
    """GPT-2 style: byte-level BPE, no BOS, EOS = <|endoftext|> used as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, tr)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def _unigram_tokenizer(vocab_size: int = 300):
    """Llama/SentencePiece style: unigram with metaspace, BOS <s> prepended, EOS </s>, pad <pad>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tr = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                 unk_token="<unk>")
    tk.train_from_iterator(CORPUS, tr)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def set_dotted(data: dict, over: dict) -> dict:
    """`data` with each dotted key of `over` (`"trainer.lr": 1e-3`) set in place, sections created as needed."""
    for key, value in over.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return data


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models run faster that way, and on a busy 2-core machine two threads
    wait on each other. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return _bpe_tokenizer()


@pytest.fixture(scope="session")
def unigram_tokenizer():
    return _unigram_tokenizer()


def tiny_gpt2(tokenizer, seed: int = 0, n_embd: int = 32, n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, bpe_tokenizer):
    """A saved GPT-2-style model + byte-BPE tokenizer folder (loadable with `models.load_model`)."""
    d = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_gpt2(bpe_tokenizer).save_pretrained(d)
    bpe_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, unigram_tokenizer):
    """A saved Llama-style model + unigram tokenizer folder (loadable with `models.load_model`)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(unigram_tokenizer).save_pretrained(d)
    unigram_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
