"""Batched KV-cache generation (common.md §7): one Meta-style loop for our TP model and Hugging Face models.

Layout (right padding): prompts sit left-aligned in a [B, total] token grid. One prefill runs the
shared prefix [0, min_prompt_len); then one position per step: rows still inside their prompt are
forced to their next prompt token, the others get the chosen token. Every position a row has seen is
a real token, so no padding mask is needed. Each row stops at its first EOS / stop id (kept), after
`max_new_tokens`, or at `max_seq_len`; the loop exits when every row has stopped.

A decoder adapter hides the model: `TPDecoder` calls our `Transformer` with its static cache,
`HFDecoder` drives a transformers causal LM through `past_key_values` (and, for the optional left
padding, an attention mask and position ids). With left padding every row starts generating at the
same column, so nothing is forced; RoPE scores depend only on position differences, so our model
needs just a key mask for it (positions stay the shared columns). A second model (`teacher`) runs in
lock-step with its own cache for the two mixed-sampling hooks:
  * MiniLLM teacher-mixed sampling: y ~ (1 - a) q + a p, recording w = q(y) / mix(y) (losses.md §4.4);
  * ATKD `mix_token`: per token, the student (probability `student_token_ratio`) or the teacher emits.
"""
import inspect
from typing import Callable, Optional, Sequence

import torch

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


# ---- decoders: (tokens [B, S] at positions [start_pos, start_pos + S)) -> last-position logits [B, V] ----

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
        elif attention_mask is not None:  # the static step reads max_seq_len keys; columns past the grid are future
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


class HFDecoder:
    """A transformers causal LM (OPT, GPT-2, Llama, ...) through its own `past_key_values`.

    With right padding every position fed is a real token: no mask, positions from the cache. With left
    padding the mask marks real tokens and position ids count them (as `transformers.generate` does).
    """

    def __init__(self, model):
        self.model = model
        config = model.config
        self.max_seq_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_batch_size = None
        self.device = next(model.parameters()).device
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.cache = self.mask = self.positions = None

    def begin(self, batch_size: int, attention_mask: Optional[torch.Tensor]) -> None:
        self.cache = None
        self.mask = None if attention_mask is None else attention_mask.long()
        self.positions = None if attention_mask is None else (self.mask.cumsum(-1) - 1).clamp(min=0)

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        end = start_pos + tokens.shape[1]
        kwargs = dict(logits_to_keep=1) if self._keep_last else {}
        if self.mask is not None:
            kwargs.update(attention_mask=self.mask[:, :end], position_ids=self.positions[:, start_pos:end])
        out = self.model(input_ids=tokens, past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def end(self) -> None:
        self.cache = self.mask = self.positions = None


def as_decoder(model, compile: bool = False):
    """Wrap a model in its adapter (a decoder passes through)."""
    if hasattr(model, "begin") and hasattr(model, "end") and callable(model):
        return model
    if hasattr(model, "flush_cache") and hasattr(model, "args"):
        return TPDecoder(model, compile=compile)
    if compile:
        raise ValueError(f"compile=True applies to common.model.Transformer, not {type(model).__name__} (for a "
                         "transformers model, use its own static cache and torch.compile)")
    if hasattr(model, "config") and hasattr(model, "generation_config"):
        return HFDecoder(model)
    raise TypeError(f"cannot generate with {type(model).__name__}: expected common.model.Transformer, a "
                    "transformers causal LM, or an object with begin/__call__/end")


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


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    draw = torch.rand(student.shape[0], generator=generator, device=generator.device, dtype=torch.float32)
    from_student = draw.to(student.device) < ratio
    s_tok, s_lp = _pick_one(student, temperature, top_p, top_k, generator, want_logprobs)
    t_tok, t_lp = _pick_one(teacher, temperature, top_p, top_k, generator, want_logprobs)
    lp = torch.where(from_student, s_lp, t_lp) if want_logprobs else None
    return torch.where(from_student, s_tok, t_tok), lp, (~from_student).long()


def _make_generator(generator, seed, device) -> torch.Generator:
    if generator is not None:
        return generator
    if seed is None:  # from the global RNG: identical on every TP rank (same seed, same calls), new per call
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


# ---- the loop ----

@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: Optional[int], temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = None, *, top_k: int = 0, stop_ids: Sequence[int] = (),
             max_seq_len: Optional[int] = None, pad_id: int = 0, padding: str = "right",
             generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
             logits_processor: Optional[LogitsProcessor] = None, return_logprobs: bool = False,
             teacher=None, teacher_mixed_alpha: float = 0.0, student_token_ratio: Optional[float] = None,
             compile: bool = False) -> Generations:
    """Generate continuations of `prompts` (token-id lists of any lengths; the caller adds BOS).

    Returns a `Generations` list: per prompt the new ids, ending with the EOS / stop id when one was
    produced. temperature 0 is greedy; otherwise softmax(logits / T) filtered by top_k then top_p, drawn
    with `generator` (or one seeded with `seed`; by default seeded from the global RNG, which
    `common.parallel.setup` seeds identically on every TP rank). `logits_processor(logits [B, V] fp32,
    tokens [B, cur]) -> logits` runs on each model's logits before sampling; `tokens` is the grid so far
    (prompt and generated tokens; left pads first with padding="left"). `max_seq_len` caps prompt +
    new tokens (default: the model's own limit). `padding="left"` (models that take a padding mask)
    aligns prompt ends, so one prefill covers every prompt: much faster than the right-padded loop
    when prompt lengths spread widely (each forced prompt position costs a full decode step).

    With `teacher` (a second model of the same vocabulary, fed the same tokens with its own cache):
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
    if B == 0:
        return Generations([], [] if return_logprobs else None)
    limits = [d.max_seq_len for d in decoders if d.max_seq_len] + ([max_seq_len] if max_seq_len else [])
    limit = min(limits) if limits else None
    lens = [len(p) for p in prompts]
    for i, n in enumerate(lens):
        if n == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        if limit is not None and n >= limit:
            raise ValueError(f"prompt {i} has {n} tokens, which leaves no room under max_seq_len={limit}; "
                             f"shorten it or raise max_seq_len")
    for d in decoders:
        if d.max_batch_size is not None and B > d.max_batch_size:
            raise ValueError(f"{B} prompts exceed the model's max_batch_size={d.max_batch_size}; split the batch "
                             "or build the model with a larger max_batch_size")
    if max_new_tokens is None and limit is None:
        raise ValueError("give max_new_tokens or max_seq_len: this model declares no length limit")
    if max_new_tokens is not None and max_new_tokens <= 0:
        return Generations([[] for _ in prompts], [[] for _ in prompts] if return_logprobs else None,
                           [[] for _ in prompts] if mixed else None, [[] for _ in prompts] if token_mix else None)
    longest = max(lens)
    budget = limit if max_new_tokens is None else longest + max_new_tokens
    total = budget if limit is None else min(limit, budget)
    max_new = total if max_new_tokens is None else max_new_tokens

    device = decoders[0].device
    if padding == "right":
        starts = lens
        grid = [list(p) + [pad_id] * (total - len(p)) for p in prompts]
        attention_mask = None
    else:
        starts = [longest] * B
        grid = [[pad_id] * (longest - len(p)) + list(p) + [pad_id] * (total - longest) for p in prompts]
        attention_mask = torch.tensor([[0] * (longest - n) + [1] * (total - longest + n) for n in lens],
                                      dtype=torch.bool, device=device)
    tokens = torch.tensor(grid, dtype=torch.long, device=device)
    start = torch.tensor(starts, device=device)
    stops = torch.tensor(sorted({*stop_ids, *([eos_id] if eos_id is not None else [])}) or [-1], device=device)
    want_lp = return_logprobs or mixed
    logprobs = torch.zeros((B, total), dtype=torch.float32, device=device) if want_lp else None  # whatever the
    weights = torch.ones((B, total), dtype=torch.float32, device=device) if mixed else None  # default dtype
    sources = torch.zeros((B, total), dtype=torch.long, device=device) if token_mix else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    can_stop_early, longest_start = bool(stop_ids) or eos_id is not None, max(starts)
    gen = _make_generator(generator, seed, device)

    models = [getattr(d, "model", None) for d in decoders]  # eval for the call (no dropout), restored after
    was_training = [getattr(m, "training", False) for m in models]
    for d, m in zip(decoders, models):
        if m is not None:
            m.eval()
        d.begin(B, attention_mask)
    try:
        prev = 0
        for cur in range(min(starts), total):
            # prefill of the shared prefix on the first step, then one position per step
            logits = [d(tokens[:, prev:cur].to(d.device), prev).to(device).float() for d in decoders]
            if len(logits) == 2 and logits[0].shape[-1] != logits[1].shape[-1]:
                raise ValueError(f"the student's vocabulary ({logits[0].shape[-1]}) and the teacher's "
                                 f"({logits[1].shape[-1]}) differ: mixing needs one vocabulary")
            if logits_processor is not None:
                logits = [logits_processor(lg, tokens[:, :cur]) for lg in logits]
            if mixed:
                nxt, lp, w = _pick_teacher_mixed(*logits, teacher_mixed_alpha, temperature, top_p, top_k, gen)
                weights[:, cur] = w
            elif token_mix:
                nxt, lp, src = _pick_mix_token(*logits, student_token_ratio, temperature, top_p, top_k, gen, want_lp)
                sources[:, cur] = src
            else:
                nxt, lp = _pick_one(logits[0], temperature, top_p, top_k, gen, want_lp)
            forced = cur < start
            tokens[:, cur] = torch.where(forced, tokens[:, cur], nxt)
            if want_lp:
                logprobs[:, cur] = lp
            prev = cur
            if can_stop_early:  # a host sync per step, needed only when a stop id can end a row early
                done |= ~forced & (torch.isin(nxt, stops) | (cur + 1 - start >= max_new))
                if bool(done.all()):
                    break
            elif cur + 1 - longest_start >= max_new:
                break
    finally:
        for d, m, training in zip(decoders, models, was_training):
            d.end()
            if training:
                m.train()

    # per row: new tokens from its start, cut after the first stop id and at max_new
    stop_set = set(stops.tolist())
    rows = tokens.tolist()
    out_tokens, spans = [], []
    for b in range(B):
        new = rows[b][starts[b]:min(total, starts[b] + max_new, prev + 1)]
        for i, t in enumerate(new):
            if t in stop_set:
                new = new[:i + 1]
                break
        out_tokens.append(new)
        spans.append((starts[b], starts[b] + len(new)))

    def per_row(t):
        return None if t is None else [t[b, s:e].tolist() for b, (s, e) in enumerate(spans)]

    return Generations(out_tokens, per_row(logprobs) if return_logprobs else None, per_row(weights),
                       per_row(sources))
