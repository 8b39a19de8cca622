"""Tiny random transformers models and a tokenizer built in code: the shared fixtures of every test.

    tok = char_tokenizer()                       # PreTrainedTokenizerFast, one id per printable character
    other = swapped_tokenizer()                  # the same with two ids swapped: same size, another vocabulary
    model = tiny_model("gpt2" | "opt" | "llama" | "t5", seed=0)
    folder = save_tiny("t5", tmp_path / "t5")    # model + tokenizer, loadable with from_pretrained

Special ids are the T5 convention for every family: pad 0, eos 1, unk 2, bos 3 (T5 starts its decoder
with pad). The vocabulary is 4 specials + 95 printable ASCII characters + "\\n" = 100 ids, padded to
VOCAB_SIZE in the model so that vocabulary-size checks see a round number.
"""
import string

import torch

VOCAB_SIZE = 128
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]
FAMILIES = ("gpt2", "opt", "llama", "t5")


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


def swapped_tokenizer(a: str = "a", b: str = "b"):
    """The character tokenizer with the ids of `a` and `b` swapped: same size, same special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(char_tokenizer().get_vocab())
    vocab[a], vocab[b] = vocab[b], vocab[a]
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")


def tiny_config(family: str, vocab_size: int = VOCAB_SIZE, **overrides):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, T5Config

    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=3)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, **special)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=64, max_position_embeddings=256, word_embed_proj_dim=32, **special)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **special)
    elif family == "t5":
        cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                       num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                       decoder_start_token_id=0, **special)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, vocab_size: int = VOCAB_SIZE, **overrides):
    """A randomly initialised fp32 model of `family` in eval mode (dropout off until .train())."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = tiny_config(family, vocab_size, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    return auto.from_config(cfg, dtype=torch.float32).eval()


def save_tiny(family: str, folder, seed: int = 0, **overrides) -> str:
    """Write a tiny model and the character tokenizer to `folder` (a from_pretrained folder); returns it."""
    folder = str(folder)
    tiny_model(family, seed, **overrides).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder
