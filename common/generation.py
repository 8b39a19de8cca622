"""Batched KV-cache generation (common.md §7): one Meta-style loop for our TP model and Hugging Face models.

Layout (right padding): prompts sit left-aligned in a [B, total] token grid. One prefill runs the
shared prefix [0, min_prompt_len); then one position per step: rows still inside their prompt are
forced to their next prompt token, the others get the chosen token. Every position a row has seen is
a real token, so no padding mask is needed. Each row stops at its first EOS / stop id (kept), after
`max_new_tokens`, or at `max_seq_len`; the loop exits when every row has stopped.

    grid = token_grid(...)                      # validation; prompts (or decoder start tokens) in the grid
    logits = prefill(decoders, grid)            # encoder, then the shared prefix, one call per model
    for cur in range(grid.first, grid.total):
        token = choose(logits, cur)             # greedy / sampled / teacher-mixed / mix_token
        ...write it, stop rows...
        logits = decode_one_token(decoders, grid.tokens[:, cur:cur + 1], cur)

An adapter hides each model: `TPDecoder` calls our `Transformer` with its static cache, `HFDecoder`
drives a transformers causal LM through a `DynamicCache` (and, for the optional left padding, an
attention mask and position ids), `HFEncoderDecoder` a transformers encoder-decoder (Flan-T5): the
prompts are its encoder inputs, encoded once in the prefill, and the grid holds decoder tokens from
the decoder start token, so every row starts generating at the same column. With left padding every
row of a decoder starts generating at the same column too, so nothing is forced; RoPE scores depend
only on position differences, so our model needs just a key mask for it (positions stay the shared
columns). A second model (`teacher`, of the same kind) runs in lock-step with its own cache for the two
mixed-sampling hooks:
  * MiniLLM teacher-mixed sampling: y ~ (1 - a) q + a p, recording w = q(y) / mix(y) (losses.md §4.4);
  * ATKD `mix_token`: per token, the student (probability `student_token_ratio`) or the teacher emits.
`pad_rollouts` turns prompts and generations back into training tensors for the on-policy methods.
"""
import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from common.distributed import dp_rank

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Generations(list):
    """Per prompt, the list of new token ids; extras are per-prompt lists aligned with those ids.

    logprobs: log-probability of each token under the distribution it was drawn from (the mixture for
      teacher-mixed sampling; for greedy, the model's softmax at temperature 1 after the processor).
    weights:  teacher-mixed sampling only, q(y) / mix(y) with q the student's sampling distribution.
    sources:  mix_token only, 0 where the student emitted the token, 1 where the teacher did.
    """

    def __init__(self, tokens, logprobs=None, weights=None, sources=None):
        super().__init__(tokens)
        self.logprobs, self.weights, self.sources = logprobs, weights, sources


# ---- adapters: (tokens [B, S] at positions [start_pos, start_pos + S)) -> last-position logits [B, V] ----

def _decode_step(model, tokens: torch.Tensor, position: torch.Tensor, key_mask: Optional[torch.Tensor]):
    return model(tokens, start_pos=position, use_cache=True, logits_to_keep=1, key_mask=key_mask)[:, -1]


_compiled_steps = {}  # torch.compile mode -> compiled `_decode_step`; dynamo keeps one graph per model and shape


class TPDecoder:
    """Our `common.model.Transformer` with its preallocated cache; left padding through its `key_mask`.

    compile=True runs each one-position step as a static-shape graph (the model's tensor-position step,
    which reads the whole cache under a mask): torch.compile, with CUDA graphs on a GPU, which removes the
    per-kernel launch cost that dominates decoding. The prefill stays eager. The first call compiles
    (seconds to a minute); the cache is then kept across calls so its address stays fixed for the graphs.
    """

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.max_seq_len = model.args.max_seq_len
        self.max_batch_size = model.args.max_batch_size
        self.device = next(model.parameters()).device
        self.compile = compile
        self.mask = None
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            if mode not in _compiled_steps:
                _compiled_steps[mode] = torch.compile(_decode_step, mode=mode)
            self.step = _compiled_steps[mode]
            self.positions = torch.arange(self.max_seq_len, device=self.device)

    def begin(self, batch_size: int, attention_mask: Optional[torch.Tensor]) -> None:
        self.mask = attention_mask
        if not self.compile:
            self.model.flush_cache()
            return
        attention = self.model.layers[0].attention
        if attention.cache_k is None or not attention.cache_finite:  # zero-filled for the static step, kept
            for layer in self.model.layers:
                layer.attention.allocate_cache(attention.wk.weight.dtype, self.device, zeros=True)
        if attention_mask is not None:  # the static step reads max_seq_len keys; columns past the grid are future
            self.mask = torch.ones(batch_size, self.max_seq_len, dtype=torch.bool, device=self.device)
            self.mask[:, :attention_mask.shape[1]] = attention_mask

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        if self.compile and tokens.shape[1] == 1 and self.model.layers[0].attention.cache_k is not None:
            torch.compiler.cudagraph_mark_step_begin()  # a new replay; its output buffer is reused by the next
            return self.step(self.model, tokens, self.positions[start_pos], self.mask).clone()
        key_mask = None if self.mask is None else self.mask[:, :start_pos + tokens.shape[1]]
        # only the last position's logits are used: skip the head on the rest of the prefill
        logits = self.model(tokens, start_pos=start_pos, use_cache=True, logits_to_keep=1, key_mask=key_mask)[:, -1]
        if self.compile:  # CUDA graphs write into a graph input only at a fixed address (re-recorded if it moves)
            for layer in self.model.layers:
                torch._dynamo.mark_static_address(layer.attention.cache_k)
                torch._dynamo.mark_static_address(layer.attention.cache_v)
        return logits

    def end(self) -> None:
        self.mask = None
        if not self.compile:
            self.model.flush_cache()


def _forward_parameters(model) -> set:
    """The named arguments of the transformers model's forward (through a peft wrapper, which takes **kwargs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _cache_argument(model) -> str:
    """The forward argument that takes a Cache object: `cache` (transformers >= 5.24) or `past_key_values`."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


class HFDecoder:
    """A transformers causal LM (OPT, GPT-2, Llama, ...) through a `DynamicCache` it fills in place.

    With right padding every position fed is a real token: no mask, positions from the cache. With left
    padding the mask marks real tokens and position ids count them (as `transformers.generate` does).
    """

    def __init__(self, model):
        self.model = model
        config = model.config
        self.max_seq_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_batch_size = None
        self.device = next(model.parameters()).device
        self._keep_last = "logits_to_keep" in _forward_parameters(model)
        self._cache_arg = _cache_argument(model)
        self.cache = self.mask = self.positions = None

    def begin(self, batch_size: int, attention_mask: Optional[torch.Tensor]) -> None:
        from transformers import DynamicCache
        self.cache = DynamicCache(config=self.model.config)  # sliding-window layers where the config has them
        self.mask = None if attention_mask is None else attention_mask.long()
        self.positions = None if attention_mask is None else (self.mask.cumsum(-1) - 1).clamp(min=0)

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        end = start_pos + tokens.shape[1]
        kwargs = dict(logits_to_keep=1) if self._keep_last else {}
        if self.mask is not None:
            kwargs.update(attention_mask=self.mask[:, :end], position_ids=self.positions[:, start_pos:end])
        kwargs[self._cache_arg] = self.cache
        return self.model(input_ids=tokens, use_cache=True, **kwargs).logits[:, -1]

    def end(self) -> None:
        self.cache = self.mask = self.positions = None


class HFEncoderDecoder:
    """A transformers encoder-decoder (T5 / Flan-T5, BART, ...): `encode` runs the encoder once per call of
    `generate`; each step feeds decoder tokens through an `EncoderDecoderCache` (self- and cross-attention).

    The grid it is driven with holds decoder tokens from `decoder_start_id` (column 0), all rows aligned:
    no decoder mask is needed. The encoder inputs are right-padded under `encoder_mask`, which the decoder's
    cross-attention also reads.
    """

    max_seq_len = max_batch_size = None  # relative positions (T5): no length limit on either side

    def __init__(self, model):
        self.model = model
        start = model.config.decoder_start_token_id
        if start is None:
            start = getattr(model.generation_config, "decoder_start_token_id", None)
        if start is None:
            raise ValueError(f"{type(model).__name__}: its config has no decoder_start_token_id; set "
                             "model.config.decoder_start_token_id (T5: the pad id, 0)")
        self.decoder_start_id = int(start)
        self.device = next(model.parameters()).device
        self._cache_arg = _cache_argument(model)
        self.encoded = self.encoder_mask = self.cache = None

    def begin(self, batch_size: int, attention_mask: Optional[torch.Tensor]) -> None:
        from transformers import DynamicCache, EncoderDecoderCache
        config = self.model.config
        self.cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.encoder_mask = attention_mask.long()
        self.encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=self.encoder_mask)

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        kwargs = {self._cache_arg: self.cache}
        out = self.model(encoder_outputs=self.encoded, attention_mask=self.encoder_mask, decoder_input_ids=tokens,
                         use_cache=True, **kwargs)
        return out.logits[:, -1]

    def end(self) -> None:
        self.encoded = self.encoder_mask = self.cache = None


def as_decoder(model, compile: bool = False):
    """Wrap a model in its adapter (an adapter passes through)."""
    if hasattr(model, "begin") and hasattr(model, "end") and callable(model):
        return model
    if hasattr(model, "flush_cache") and hasattr(model, "args"):
        return TPDecoder(model, compile=compile)
    if compile:
        raise ValueError(f"compile=True applies to common.model.Transformer, not {type(model).__name__} (for a "
                         "transformers model, use its own static cache and torch.compile)")
    if hasattr(model, "config") and hasattr(model, "generation_config"):
        if getattr(model.config, "is_encoder_decoder", False):
            return HFEncoderDecoder(model)
        return HFDecoder(model)
    raise TypeError(f"cannot generate with {type(model).__name__}: expected common.model.Transformer, a "
                    "transformers causal LM or encoder-decoder, or an object with begin/__call__/end")


def _encoder_decoder(d) -> bool:
    """An adapter of an encoder-decoder declares its decoder start token and takes `encode(ids, mask)`."""
    return getattr(d, "decoder_start_id", None) is not None


# ---- sampling maths ----

def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """softmax(logits / T) restricted to the top-k, then the top-p nucleus, renormalised (fp32 [B, V]).

    Top-p keeps a token unless the mass of the tokens ranked before it already exceeds p.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, list):  # one generator per row: a row's draws do not depend on its batch
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[:, 0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _uniform(n: int, generator) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float32) for g in generator])
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32)


def _pick_one(logits, temperature, top_p, top_k, generator, want_logprobs):
    """Token and (optionally) its log-probability from one model's processed logits."""
    if temperature == 0:
        token = logits.argmax(-1)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, token[:, None])[:, 0] if want_logprobs else None
        return token, lp
    probs = sampling_probs(logits, temperature, top_p, top_k)
    token = _draw(probs, generator)
    return token, (probs.gather(-1, token[:, None])[:, 0].log() if want_logprobs else None)


def _pick_teacher_mixed(student, teacher, alpha, temperature, top_p, top_k, generator):
    """MiniLLM: y ~ mix = (1 - a) q + a p (each after temperature / top-k / top-p); w = q(y) / mix(y)."""
    q = sampling_probs(student, temperature, top_p, top_k)
    mix = (1.0 - alpha) * q + alpha * sampling_probs(teacher, temperature, top_p, top_k)
    token = _draw(mix, generator)
    q_y, mix_y = q.gather(-1, token[:, None])[:, 0], mix.gather(-1, token[:, None])[:, 0]
    return token, mix_y.log(), q_y / mix_y


def _pick_mix_token(student, teacher, ratio, temperature, top_p, top_k, generator, want_logprobs):
    """ATKD mix_token: per row, the student emits with probability `ratio`, else the teacher."""
    draw = _uniform(student.shape[0], generator)
    from_student = draw.to(student.device) < ratio
    s_tok, s_lp = _pick_one(student, temperature, top_p, top_k, generator, want_logprobs)
    t_tok, t_lp = _pick_one(teacher, temperature, top_p, top_k, generator, want_logprobs)
    lp = torch.where(from_student, s_lp, t_lp) if want_logprobs else None
    return torch.where(from_student, s_tok, t_tok), lp, (~from_student).long()


def _default_seed() -> int:
    """A new seed per call from the global RNG, offset by the DP rank: the ranks of a TP group (same RNG
    state, same DP rank) draw the same tokens, while DP ranks holding the same RNG state still differ."""
    return int(torch.randint(0, 2**62, (1,)).item()) + dp_rank()


def _make_generator(generator, seed, device, n_rows: int):
    """A generator, or with a list of seeds one generator per row."""
    if generator is not None:
        return generator
    if isinstance(seed, (list, tuple)):
        if len(seed) != n_rows:
            raise ValueError(f"seed: {len(seed)} seeds for {n_rows} prompts; give one per prompt or a single int")
        return [torch.Generator(device=device).manual_seed(s) for s in seed]
    return torch.Generator(device=device).manual_seed(_default_seed() if seed is None else seed)


# ---- the loop: validation and the token grid, the prefill, one decode step ----

@dataclass
class TokenGrid:
    """One batch laid out for the loop. `tokens` [B, total] holds the prompts (decoders) or the decoder start
    token (encoder-decoders) and receives the chosen tokens; row b generates from column `starts[b]`."""
    tokens: torch.Tensor
    starts: list
    max_new: int
    attention_mask: Optional[torch.Tensor] = None  # decoders with left padding: the grid's real tokens
    encoder_ids: Optional[torch.Tensor] = None  # encoder-decoders: the prompts, right-padded, under encoder_mask
    encoder_mask: Optional[torch.Tensor] = None

    @property
    def total(self) -> int:
        return self.tokens.shape[1]

    @property
    def first(self) -> int:
        return min(self.starts)


def token_grid(decoders, prompts, max_new_tokens, max_seq_len, pad_id, padding) -> Optional[TokenGrid]:
    """Check the models, prompts and lengths; lay the batch out (None when max_new_tokens <= 0)."""
    seq2seq = [_encoder_decoder(d) for d in decoders]
    if any(seq2seq) and not all(seq2seq):
        raise ValueError("the student and the teacher must both be decoders or both be encoder-decoders")
    seq2seq = seq2seq[0]
    if seq2seq and len({d.decoder_start_id for d in decoders}) > 1:
        raise ValueError(f"the student and the teacher start decoding from different tokens "
                         f"({[d.decoder_start_id for d in decoders]}): set one decoder_start_token_id in both configs")
    B = len(prompts)
    limits = [d.max_seq_len for d in decoders if d.max_seq_len] + ([max_seq_len] if max_seq_len else [])
    limit = min(limits) if limits else None  # encoder-decoders: of the decoder sequence, start token included
    lens = [len(p) for p in prompts]
    for i, n in enumerate(lens):
        if n == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        if limit is not None and (1 if seq2seq else n) >= limit:
            raise ValueError(f"prompt {i} has {n} tokens, which leaves no room under max_seq_len={limit}; "
                             f"shorten it or raise max_seq_len")
    for d in decoders:
        if d.max_batch_size is not None and B > d.max_batch_size:
            raise ValueError(f"{B} prompts exceed the model's max_batch_size={d.max_batch_size}; split the batch "
                             "or build the model with a larger max_batch_size")
    if max_new_tokens is None and limit is None:
        raise ValueError("give max_new_tokens or max_seq_len: this model declares no length limit")
    if max_new_tokens is not None and max_new_tokens <= 0:
        return None

    device = decoders[0].device
    longest = max(lens)
    prefix = 1 if seq2seq else longest  # the columns before the first chosen token of the longest prompt
    budget = limit if max_new_tokens is None else prefix + max_new_tokens
    total = budget if limit is None else min(limit, budget)
    max_new = total if max_new_tokens is None else max_new_tokens
    if seq2seq:  # the decoder starts every row at column 1; the prompts go to the encoder, right-padded
        tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
        tokens[:, 0] = decoders[0].decoder_start_id
        encoder_ids = torch.tensor([list(p) + [pad_id] * (longest - len(p)) for p in prompts], device=device)
        encoder_mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lens], device=device)
        return TokenGrid(tokens, [1] * B, max_new, encoder_ids=encoder_ids, encoder_mask=encoder_mask)
    if padding == "right":
        grid = [list(p) + [pad_id] * (total - len(p)) for p in prompts]
        return TokenGrid(torch.tensor(grid, dtype=torch.long, device=device), lens, max_new)
    grid = [[pad_id] * (longest - len(p)) + list(p) + [pad_id] * (total - longest) for p in prompts]
    attention_mask = torch.tensor([[0] * (longest - n) + [1] * (total - longest + n) for n in lens],
                                  dtype=torch.bool, device=device)
    return TokenGrid(torch.tensor(grid, dtype=torch.long, device=device), [longest] * B, max_new, attention_mask)


@contextlib.contextmanager
def _generating(decoders, batch_size: int, attention_mask: Optional[torch.Tensor]):
    """Each model in eval mode (no dropout) with a fresh cache for the call; train mode restored after."""
    models = [getattr(d, "model", None) for d in decoders]
    was_training = [getattr(m, "training", False) for m in models]
    for d, m in zip(decoders, models):
        if m is not None:
            m.eval()
        d.begin(batch_size, attention_mask)
    try:
        yield
    finally:
        for d, m, training in zip(decoders, models, was_training):
            d.end()
            if training:
                m.train()


def prefill(decoders, grid: TokenGrid) -> list:
    """Each model's first forward: the encoder over the prompts (encoder-decoders), then the grid's shared
    prefix [0, first) in one call. Returns each model's fp32 logits [B, V] for column `first`."""
    device = decoders[0].device
    for d in decoders:
        if grid.encoder_ids is not None:
            d.encode(grid.encoder_ids.to(d.device), grid.encoder_mask.to(d.device))
    prefix = grid.tokens[:, :grid.first]
    logits = [d(prefix.to(d.device), 0).to(device).float() for d in decoders]
    if len(logits) == 2 and logits[0].shape[-1] != logits[1].shape[-1]:
        raise ValueError(f"the student's vocabulary ({logits[0].shape[-1]}) and the teacher's "
                         f"({logits[1].shape[-1]}) differ: mixing needs one vocabulary")
    return logits


def decode_one_token(decoders, token: torch.Tensor, pos: int) -> list:
    """Feed column `pos` (token [B, 1]) to each model's cache; each model's fp32 logits [B, V] for pos + 1."""
    device = decoders[0].device
    return [d(token.to(d.device), pos).to(device).float() for d in decoders]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: Optional[int], temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = None, *, top_k: int = 0, stop_ids: Sequence[int] = (),
             max_seq_len: Optional[int] = None, pad_id: int = 0, padding: str = "right",
             generator: Optional[torch.Generator] = None, seed: Union[int, Sequence[int], None] = None,
             logits_processor: Optional[LogitsProcessor] = None, return_logprobs: bool = False,
             teacher=None, teacher_mixed_alpha: float = 0.0, student_token_ratio: Optional[float] = None,
             compile: bool = False) -> Generations:
    """Generate continuations of `prompts` (token-id lists of any lengths; the caller adds BOS).

    Returns a `Generations` list: per prompt the new ids, ending with the EOS / stop id when one was
    produced. temperature 0 is greedy; otherwise softmax(logits / T) filtered by top_k then top_p, drawn
    with `generator` (or one seeded with `seed`; by default seeded from the global RNG plus the
    data-parallel rank, so the ranks of a TP group draw the same tokens and DP ranks differ). A list of
    seeds, one per prompt, gives each row its own generator: with left padding (or prompts of one length) a
    row then draws the same tokens whatever else is in its batch (up to the batch's effect on the logits'
    rounding); with right padding a row also draws at the columns of longer prompts, so its draws depend on
    the batch's shortest prompt.
    `logits_processor(logits [B, V] fp32, tokens [B, cur]) -> logits` runs on each model's logits before
    sampling; `tokens` is the grid so far (prompt and generated tokens; left pads first with
    padding="left"; for an encoder-decoder, the decoder tokens from its start token). `max_seq_len` caps
    prompt + new tokens (default: the model's own limit). `padding="left"` (models that take a padding
    mask) aligns prompt ends, so one prefill covers every prompt: much faster than the right-padded loop
    when prompt lengths spread widely (each forced prompt position costs a full decode step).

    A transformers encoder-decoder (Flan-T5) takes `prompts` as its encoder inputs (right-padded under a
    mask) and returns the decoder tokens after its decoder start token; `max_seq_len` then caps the
    decoder sequence (start token included) and `padding` does not apply.

    With `teacher` (a second model of the same vocabulary and kind, fed the same tokens with its own cache):
    `teacher_mixed_alpha > 0` samples from (1 - a) q + a p and records `weights`; `student_token_ratio`
    makes each token come from the student with that probability, else the teacher (`sources`).

    `compile=True` (the model must be our Transformer; a transformers teacher stays eager) replays each
    decode step as a compiled static-shape graph, with CUDA graphs on a GPU; see `TPDecoder`.
    """
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    decoders = [as_decoder(model, compile)]
    mixed = teacher is not None and teacher_mixed_alpha > 0
    token_mix = teacher is not None and student_token_ratio is not None
    if teacher is not None:
        if mixed == token_mix:
            raise ValueError("with a teacher, set exactly one of teacher_mixed_alpha > 0 (MiniLLM) or "
                             "student_token_ratio (ATKD mix_token)")
        if mixed and temperature == 0:
            raise ValueError("teacher-mixed sampling draws from a mixture: use temperature > 0")
        decoders.append(as_decoder(teacher, compile and hasattr(teacher, "flush_cache")))
    elif teacher_mixed_alpha > 0 or student_token_ratio is not None:
        raise ValueError("teacher_mixed_alpha / student_token_ratio need a teacher model")
    B = len(prompts)
    grid = token_grid(decoders, prompts, max_new_tokens, max_seq_len, pad_id, padding) if B else None
    if grid is None:  # no prompt, or max_new_tokens <= 0: no model call at all
        def empty():
            return [[] for _ in prompts]
        return Generations(empty(), empty() if return_logprobs else None, empty() if mixed else None,
                           empty() if token_mix else None)

    device, tokens, total, max_new = decoders[0].device, grid.tokens, grid.total, grid.max_new
    start = torch.tensor(grid.starts, device=device)
    stops = torch.tensor(sorted({*stop_ids, *([eos_id] if eos_id is not None else [])}) or [-1], device=device)
    want_lp = return_logprobs or mixed
    logprobs = torch.zeros((B, total), dtype=torch.float32, device=device) if want_lp else None  # whatever the
    weights = torch.ones((B, total), dtype=torch.float32, device=device) if mixed else None  # default dtype
    sources = torch.zeros((B, total), dtype=torch.long, device=device) if token_mix else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    can_stop_early, longest_start = bool(stop_ids) or eos_id is not None, max(grid.starts)
    gen = _make_generator(generator, seed, device, B)

    def choose(logits, cur):
        """Column `cur`'s token for each row, its log-probability, and its weight (mixed) or source (mix_token)."""
        if logits_processor is not None:
            logits = [logits_processor(lg, tokens[:, :cur]) for lg in logits]
        if mixed:
            return _pick_teacher_mixed(*logits, teacher_mixed_alpha, temperature, top_p, top_k, gen)
        if token_mix:
            return _pick_mix_token(*logits, student_token_ratio, temperature, top_p, top_k, gen, want_lp)
        return (*_pick_one(logits[0], temperature, top_p, top_k, gen, want_lp), None)

    with _generating(decoders, B, grid.attention_mask):
        logits = prefill(decoders, grid)
        for cur in range(grid.first, total):
            nxt, lp, extra = choose(logits, cur)
            forced = cur < start
            tokens[:, cur] = torch.where(forced, tokens[:, cur], nxt)
            if want_lp:
                logprobs[:, cur] = lp
            if extra is not None:
                (weights if mixed else sources)[:, cur] = extra
            if cur + 1 == total:
                break
            if can_stop_early:  # a host sync per step, needed only when a stop id can end a row early
                done |= ~forced & (torch.isin(nxt, stops) | (cur + 1 - start >= max_new))
                if bool(done.all()):
                    break
            elif cur + 1 - longest_start >= max_new:
                break
            logits = decode_one_token(decoders, tokens[:, cur:cur + 1], cur)

    # per row: new tokens from its start, cut after the first stop id and at max_new
    stop_set = set(stops.tolist())
    rows = tokens.tolist()
    out_tokens, spans = [], []
    for b, s in enumerate(grid.starts):
        new = rows[b][s:min(s + max_new, cur + 1)]
        for i, t in enumerate(new):
            if t in stop_set:
                new = new[:i + 1]
                break
        out_tokens.append(new)
        spans.append((s, s + len(new)))

    def per_row(t):
        return None if t is None else [t[b, s:e].tolist() for b, (s, e) in enumerate(spans)]

    return Generations(out_tokens, per_row(logprobs) if return_logprobs else None, per_row(weights),
                       per_row(sources))


# ---- rollouts back into training tensors (on-policy methods) ----

@dataclass
class Rollouts:
    """Prompts and their generations as right-padded training tensors, aligned with the model's UNSHIFTED
    logits [B, S, V]: the logits at position t score `targets[:, t]`, so no caller slices `logits[:, :-1]`.

    Decoder: input_ids = prompt + response; targets[t] = input_ids[t + 1] (pad_id past the end).
    Encoder-decoder: input_ids = the prompt (encoder), decoder_input_ids = start + response[:-1],
    targets[t] = response[t] (no shift).
    response_mask (bool) marks the positions whose target is a generated token; there `logprobs` holds the
    sampling policy's log-probability of that token and `weights` its teacher-mixed weight (0 and 1 elsewhere).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    decoder_input_ids: Optional[torch.Tensor] = None
    decoder_attention_mask: Optional[torch.Tensor] = None

    def model_inputs(self) -> dict:
        """The keyword arguments of a transformers forward that gives the aligned logits."""
        names = ["input_ids", "attention_mask"]
        if self.decoder_input_ids is not None:
            names += ["decoder_input_ids", "decoder_attention_mask"]
        return {name: getattr(self, name) for name in names}


def pad_rollouts(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
                 decoder_start_id: Optional[int] = None, logprobs: Optional[Sequence[Sequence[float]]] = None,
                 weights: Optional[Sequence[Sequence[float]]] = None, device=None) -> Rollouts:
    """Pad prompts and their responses (a `Generations`, or lists of ids) into a `Rollouts` batch.

    With `decoder_start_id` the model is an encoder-decoder and the prompts are its encoder inputs. The
    per-token `logprobs` / `weights` default to those the `Generations` carries.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: give one response per prompt")
    logprobs = getattr(responses, "logprobs", None) if logprobs is None else logprobs
    weights = getattr(responses, "weights", None) if weights is None else weights
    for name, per_token in (("logprobs", logprobs), ("weights", weights)):
        for b, (values, response) in enumerate(zip(per_token or [], responses)):
            if len(values) != len(response):
                raise ValueError(f"{name} of response {b} has {len(values)} values for its {len(response)} tokens")
    for b, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {b} is empty: give at least one token (e.g. BOS)")

    def padded(rows, fill, dtype, width=None):
        width = width or max(1, max(len(r) for r in rows))
        return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=dtype, device=device)

    if decoder_start_id is None:  # one sequence: the logits at the last prompt token score the first response token
        sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
        width = max(len(s) for s in sequences)
        out = dict(input_ids=padded(sequences, pad_id, torch.long),
                   attention_mask=padded([[1] * len(s) for s in sequences], 0, torch.long),
                   targets=padded([s[1:] for s in sequences], pad_id, torch.long, width))
        offsets = [len(p) - 1 for p in prompts]
    else:  # the decoder reads [start] + response[:-1] and scores the response at the same positions
        decoder_rows = [[decoder_start_id] + list(r[:-1]) for r in responses]
        width = max(len(d) for d in decoder_rows)
        out = dict(input_ids=padded(prompts, pad_id, torch.long),
                   attention_mask=padded([[1] * len(p) for p in prompts], 0, torch.long),
                   decoder_input_ids=padded(decoder_rows, pad_id, torch.long),
                   decoder_attention_mask=padded([[1] * len(d) for d in decoder_rows], 0, torch.long),
                   targets=padded(responses, pad_id, torch.long, width))
        offsets = [0] * len(prompts)

    def at_responses(rows, fill, dtype):  # each row's per-token values at the positions that score its response
        return padded([[fill] * o + list(r) for o, r in zip(offsets, rows)], fill, dtype, width)

    return Rollouts(**out, response_mask=at_responses([[True] * len(r) for r in responses], False, torch.bool),
                    logprobs=None if logprobs is None else at_responses(logprobs, 0.0, torch.float32),
                    weights=None if weights is None else at_responses(weights, 1.0, torch.float32))
