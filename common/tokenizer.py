"""Tokenizers behind one interface (common.md §6).

    tok = load_tokenizer(path)       # a SentencePiece .model, a folder with tokenizer.model,
                                     # or a Hugging Face tokenizer folder (tokenizer.json / tokenizer_config.json)
    ids = tok.encode(text, bos=True, eos=False)
    text = tok.decode(ids)           # BOS / EOS / pad are dropped
    tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size
    ids, offsets = tok.encode_with_offsets(text)   # no BOS/EOS; offsets[k] = (begin, end) character span
    ids = tok.encode_chat([{"role": "user", "content": text}])   # the HF chat template, ending with the
                                     # assistant header (add_generation_prompt); tok.has_chat_template says if any

`bos_id` is None when the tokenizer has no BOS token (Qwen2); `encode(..., bos=True)` then adds nothing.
`pad_id` is the model's pad token, else 0 for SentencePiece (as the original LLaMA wrapper) and EOS for a
Hugging Face tokenizer without one; padded positions are never supervised, so only its range matters.

`train_sentencepiece(lines, model_prefix, vocab_size)` trains a small LLaMA-style model (BPE, digits split,
byte fallback, unk 0 / bos 1 / eos 2, no pad) in seconds; `python -m common.tokenizer train --input_files
a.json,b.txt --model_prefix out/tok` does the same from text or JSON files.
"""
import hashlib
import io
import json
import os
from pathlib import Path

from common.cli import UserError, check_choice, check_range, run_cli

HF_FILES = ("tokenizer.json", "tokenizer_config.json")
SP_FILE = "tokenizer.model"


class SentencePieceTokenizer:
    def __init__(self, model_file):
        from sentencepiece import SentencePieceProcessor

        self.path = str(model_file)
        self.sp = SentencePieceProcessor(model_file=self.path)
        self.bos_id = _none_if_negative(self.sp.bos_id())
        self.eos_id = _none_if_negative(self.sp.eos_id())
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else 0  # the original wrapper padded with 0 (LLaMA's <unk>)
        self.vocab_size = self.sp.vocab_size()
        self.has_chat_template = False

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        raise ValueError(f"{self.path}: a SentencePiece model has no chat template; use a Hugging Face tokenizer "
                         "folder with chat_template.jinja, or drop the chat-template option")

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return _add_special(self.sp.encode(text), self.bos_id if bos else None, self.eos_id if eos else None)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id)])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        try:
            out = self.sp.encode(text, return_type="offset_mapping")
        except (ValueError, TypeError) as e:
            raise RuntimeError("character offsets need sentencepiece >= 0.2.1 (return_type='offset_mapping')") from e
        return list(out["ids"]), [tuple(o) for o in out["offsets"]]


class HFTokenizer:
    def __init__(self, folder):
        from transformers import AutoTokenizer

        self.path = str(folder)
        self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos_id or 0)
        self.vocab_size = len(self.tok)
        self.has_chat_template = bool(self.tok.chat_template)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ([{"role", "content"}, ...]) rendered by the tokenizer's chat template."""
        if not self.has_chat_template:
            raise ValueError(f"{self.path}: this tokenizer has no chat template (no chat_template.jinja or "
                             "tokenizer_config.json 'chat_template'); drop the chat-template option")
        out = self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return _add_special(ids, self.bos_id if bos else None, self.eos_id if eos else None)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not self.tok.is_fast:
            raise RuntimeError(f"{self.path}: character offsets need a fast tokenizer (tokenizer.json)")
        out = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]


def _none_if_negative(i: int):
    return None if i < 0 else i


def _add_special(ids, bos_id, eos_id) -> list[int]:
    ids = list(ids)
    if bos_id is not None:
        ids = [bos_id] + ids
    if eos_id is not None:
        ids = ids + [eos_id]
    return ids


def resolve_tokenizer_path(path) -> tuple[str, Path]:
    """("sentencepiece", model file) or ("hf", folder); a UserError naming the path otherwise.

    A folder with tokenizer.json or tokenizer_config.json is loaded by transformers (its config knows the
    special tokens), a folder with only tokenizer.model (Meta checkpoint layout) by SentencePiece.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return "sentencepiece", p
    if p.is_file() and p.name in HF_FILES:
        return "hf", p.parent
    if p.is_dir():
        if any((p / f).is_file() for f in HF_FILES):
            return "hf", p
        if (p / SP_FILE).is_file():
            return "sentencepiece", p / SP_FILE
    raise UserError(
                    f"no tokenizer at {str(path)!r}: expected a SentencePiece .model file, or a folder containing "
                    f"{SP_FILE} (SentencePiece) or {' / '.join(HF_FILES)} (Hugging Face)"
    )


def load_tokenizer(path):
    kind, p = resolve_tokenizer_path(path)
    return SentencePieceTokenizer(p) if kind == "sentencepiece" else HFTokenizer(p)


def tokenizer_sha256(path) -> str:
    """Fingerprint of the tokenizer files (the .model file, or the folder's tokenizer files, sorted by name)."""
    kind, p = resolve_tokenizer_path(path)
    files = [p] if kind == "sentencepiece" else sorted(
        f for f in p.iterdir()
        if f.is_file() and (f.name.startswith(("tokenizer", "chat_template")) or
                            f.name in ("special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"))
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def train_sentencepiece(lines, model_prefix, vocab_size: int = 1000, model_type: str = "bpe") -> str:
    """Train a LLaMA-style SentencePiece model on `lines` (strings; may contain newlines); returns the .model path.

    Settings follow the LLaMA tokenizer: identity normalisation, dummy prefix, whitespace kept, digits split,
    byte fallback (any text encodes), unk 0 / bos 1 / eos 2, no pad piece. Single-threaded and unshuffled,
    so the same lines give the same model. Every character of the corpus gets a piece, so `vocab_size` is raised
    to 259 + the number of distinct characters when smaller; on a tiny corpus the vocabulary may come out
    smaller than asked (no hard limit).
    """
    import sentencepiece as spm

    lines = [line for line in lines if line]
    if not lines:
        raise UserError("train_sentencepiece: no text to train on (are the input files empty?)")
    vocab_size = max(vocab_size, 3 + 256 + len(set("".join(lines))))  # specials + byte pieces + characters
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, shuffle_input_sentence=False,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
    )
    path = f"{model_prefix}.model"
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return path


def text_lines(files) -> list[str]:
    """Training text from files: `.json` lists of records give every string field (and strings in list fields,
    e.g. rationales); `.jsonl` likewise per line; anything else is read line by line."""
    out = []
    for file in files:
        if not os.path.isfile(file):
            raise UserError(f"--input_files {file}: no such file")
        if file.endswith(".json") or file.endswith(".jsonl"):
            with open(file) as f:
                text = f.read()
            try:
                records = json.loads(text) if file.endswith(".json") else \
                    [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                where = f"{file}:{e.lineno}" if file.endswith(".json") else file
                raise UserError(f"{where} is not valid JSON ({e.msg}); fix the file or pass plain text") from None
            for r in records if isinstance(records, list) else [records]:
                for v in (r.values() if isinstance(r, dict) else [r]):
                    out.extend(s for s in (v if isinstance(v, list) else [v]) if isinstance(s, str))
        else:
            with open(file) as f:
                out.extend(line.rstrip("\n") for line in f)
    return out


MODEL_TYPES = ("bpe", "unigram", "char", "word")


def train(input_files, model_prefix, vocab_size: int = 1000, model_type: str = "bpe"):
    """CLI: train a SentencePiece model from text / JSON files (comma-separated or a list)."""
    check_choice("--model_type", model_type, MODEL_TYPES)
    check_range("--vocab_size", vocab_size, low=1)
    files = input_files.split(",") if isinstance(input_files, str) else list(input_files)
    path = train_sentencepiece(text_lines(files), model_prefix, vocab_size, model_type)
    print(f"wrote {path} (vocab {SentencePieceTokenizer(path).vocab_size})")


if __name__ == "__main__":
    run_cli({"train": train})
