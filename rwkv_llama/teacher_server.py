"""The frozen teacher served to a group of trainers over torch.distributed (spec §3.2): NCCL on GPUs, gloo on CPU.

    # one server per group of trainers; the server is the last rank of its group
    python -m rwkv_llama.teacher_server --model_id DIR --batch 3 --length 2048 --size 4 \
        --output_all_hiddens --device_id 0 --nccl_id_file nccl.txt_0

Each round every active trainer sends [op, B, L, seq] then input_ids (B, L) and lengths (B); the server runs
one batched forward over the whole group and sends each its logits (B, L, V) and, with --output_all_hiddens,
its hidden states (n_layers*B, L, D), layer-major as cat(hidden_states[1:]). Unlike the original (cupy NCCL,
no handshake, no shutdown, no timeouts) a handshake checks every shape, dtype and flag, a SHUTDOWN op ends a
client, and every wait has a deadline: a dead or misbehaving peer stops the whole group with a clear error.
The rendezvous file (JSON: protocol, host, port, size, backend, nonce) is written atomically.
"""
import datetime
import json
import os
import secrets
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from common.io import atomic_write_json

PROTOCOL = "kdzoo-rwkv-teacher/1"
MAGIC, VERSION = 0x52574B56, 1
FORWARD, SHUTDOWN = 1, 2
OK, ERROR = 0, 1
REQUEST_TAG, REPLY_TAG = 0, 1
MESSAGE_BYTES = 1024
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# handshake header: (field, flag that sets it on the server, flag that sets it on a trainer)
HEADER = (("magic", "", ""), ("version", "", ""), ("batch", "--batch", "--micro_bsz"),
          ("length", "--length", "--max_seq_length"), ("vocab", "--model_id", "the student's vocabulary"),
          ("hidden", "--model_id", "the student's hidden size"), ("n_layers", "--model_id", "the student's layers"),
          ("logits_dtype", "--logits_dtype", "teach_mode.logits_dtype"),
          ("output_all_hiddens", "--output_all_hiddens", "teach_mode.is_hidden_align"),
          ("pad_id", "--model_id (its tokenizer's eos)", "the student's tokenizer"), ("size", "--size",
          "num_devices / num_groups + 1"))


class TeacherError(RuntimeError):
    """A peer of the teacher group failed, timed out or broke the protocol."""


def teacher_outputs(model, input_ids, lengths, output_all_hiddens: bool):
    """The teacher's fp32 logits (B, L, V) and, if asked, hidden states (n_layers*B, L, D) = cat(hidden_states[1:]).
    The attention mask comes from the lengths (the original's ids != eos also hid real end-of-turn tokens)."""
    mask = (torch.arange(input_ids.shape[1], device=input_ids.device)[None] < lengths[:, None]).long()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=output_all_hiddens)
    hidden = torch.cat(out.hidden_states[1:], 0).float() if output_all_hiddens else None
    return out.logits.float(), hidden


class InProcessTeacher:
    """The teacher in the training process, behind the interface of TeacherClient."""

    def __init__(self, model, output_all_hiddens: bool = False):
        self.model, self.output_all_hiddens = model.eval().requires_grad_(False), output_all_hiddens

    def forward(self, input_ids, lengths):
        return teacher_outputs(self.model, input_ids, lengths, self.output_all_hiddens)

    def shutdown(self):
        pass


# ---------------------------------------------------------------------------------------------------------
# Transport helpers (a process group built from the server's TCP store, independent of any DP world)

def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"--backend must be auto, nccl or gloo, got {backend!r}")
    return backend


def _process_group(backend: str, store, rank: int, size: int, timeout_s: float):
    store = dist.PrefixStore("teacher", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, _timedelta(timeout_s))
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")   # wait(timeout) is honoured only in blocking mode
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = _timedelta(timeout_s)
    return dist.ProcessGroupNCCL(store, rank, size, options)


def _wait(work, timeout_s: float):
    work.wait(_timedelta(timeout_s))


def _message(text: str, device) -> torch.Tensor:
    raw = list(text.encode()[:MESSAGE_BYTES])
    return torch.tensor(raw + [0] * (MESSAGE_BYTES - len(raw)), dtype=torch.uint8, device=device)


def _text(buf: torch.Tensor) -> str:
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode(errors="replace")


def header_values(*, batch, length, vocab, hidden, n_layers, logits_dtype, output_all_hiddens, pad_id, size):
    if logits_dtype not in WIRE_DTYPES:
        raise ValueError(f"logits_dtype must be one of {list(WIRE_DTYPES)}, got {logits_dtype!r}")
    values = dict(magic=MAGIC, version=VERSION, batch=batch, length=length, vocab=vocab, hidden=hidden,
                  n_layers=n_layers, logits_dtype=list(WIRE_DTYPES).index(logits_dtype),
                  output_all_hiddens=int(bool(output_all_hiddens)), pad_id=pad_id, size=size)
    return torch.tensor([int(values[name]) for name, _, _ in HEADER], dtype=torch.long)


def header_mismatch(server: torch.Tensor, client: torch.Tensor, client_rank: int) -> Optional[str]:
    """One line naming the first differing field, both values and the flags to change; None if they agree."""
    for i, (name, server_flag, client_flag) in enumerate(HEADER):
        s, c = int(server[i]), int(client[i])
        if s == c:
            continue
        if name in ("magic", "version"):
            return f"client {client_rank} speaks another protocol ({name} {c} != {s}); use one kdzoo version"
        if name == "logits_dtype":
            s, c = list(WIRE_DTYPES)[s], list(WIRE_DTYPES)[c]
        if name == "vocab":
            return (f"student vocabulary {c} != teacher vocabulary {s} (client {client_rank}): student and "
                    f"teacher must share one tokenizer; build the student from the teacher's --model_id")
        return (f"client {client_rank} has {name} {c} but the teacher server has {s}: start the server with "
                f"{server_flag} matching, or set {client_flag} to {s}")
    return None


# ---------------------------------------------------------------------------------------------------------
# Server

def serve(model, *, batch: int, length: int, size: int, nccl_id_file: str, output_all_hiddens: bool = False,
          logits_dtype: str = "fp32", pad_id: int = 0, backend: str = "auto", host: str = "127.0.0.1",
          port: int = 0, device="cpu", connect_timeout_s: float = 600, request_timeout_s: float = 1800,
          log_every: int = 50) -> int:
    """Serve `model` to size-1 clients until all have sent SHUTDOWN (returns 0) or one fails (returns 1)."""
    device = torch.device(device)
    backend = _resolve_backend(backend, device)
    if size < 2:
        raise ValueError(f"--size {size}: the group holds the server and at least one trainer, so size >= 2")
    cfg = model.config
    vocab = model.get_output_embeddings().weight.shape[0]
    own = header_values(batch=batch, length=length, vocab=vocab, hidden=cfg.hidden_size,
                        n_layers=cfg.num_hidden_layers, logits_dtype=logits_dtype,
                        output_all_hiddens=output_all_hiddens, pad_id=pad_id, size=size)
    wire = WIRE_DTYPES[logits_dtype]
    rank, clients = size - 1, list(range(size - 1))
    nonce = secrets.randbits(62)
    store = dist.TCPStore(host, port, None, True, _timedelta(connect_timeout_s), wait_for_workers=False)
    store.set("nonce", str(nonce))
    atomic_write_json(dict(protocol=PROTOCOL, host=host, port=store.port, size=size, backend=backend,
                           nonce=nonce, pid=os.getpid()), nccl_id_file)
    print(f"[teacher {nccl_id_file}] listening on {host}:{store.port}, waiting for {size - 1} clients "
          f"(batch {batch}, length {length}, {backend})", flush=True)
    try:
        pg = _process_group(backend, store, rank, size, connect_timeout_s)
    except RuntimeError as e:
        print(f"[teacher {nccl_id_file}] error: not all {size - 1} clients joined within {connect_timeout_s}s: "
              f"{e}", file=sys.stderr, flush=True)
        return 1

    def reply(c, status, text="", timeout_s=request_timeout_s):
        _wait(pg.send([torch.tensor([status, 0, 0, 0], device=device)], c, REPLY_TAG), timeout_s)
        _wait(pg.send([_message(text, device)], c, REPLY_TAG), timeout_s)

    def fail(text, failed=()):
        print(f"[teacher {nccl_id_file}] error: {text}", file=sys.stderr, flush=True)
        for c in clients:            # best effort: tell every other client why the group stops
            if c not in failed:
                try:
                    reply(c, ERROR, f"teacher server {nccl_id_file}: {text}", timeout_s=10)
                except RuntimeError:
                    pass
        return 1

    # handshake: every client's header against ours, then ours back to each
    phase, c = "handshake", 0
    try:
        headers = []
        for c in clients:     # every header first: a client blocked in its send could not hear an error
            headers.append(torch.zeros(len(HEADER), dtype=torch.long, device=device))
            _wait(pg.recv([headers[-1]], c, REQUEST_TAG), connect_timeout_s)
        for c, theirs in zip(clients, headers):
            problem = header_mismatch(own, theirs.cpu(), c)
            if problem:
                return fail(problem)
        for c in clients:
            reply(c, OK)
            _wait(pg.send([own.to(device)], c, REPLY_TAG), connect_timeout_s)
    except RuntimeError as e:
        return fail(f"client {c} failed during the {phase}: {e}", failed=(c,))
    print(f"[teacher {nccl_id_file}] handshake done with {len(clients)} clients", flush=True)

    seq, t_infer, t_transfer = 0, 0.0, 0.0
    while clients:
        phase = "waiting for a request"
        ids, lengths, forwarders = [], [], []
        t0 = time.perf_counter()
        try:
            for c in list(clients):
                head = torch.zeros(4, dtype=torch.long, device=device)
                _wait(pg.recv([head], c, REQUEST_TAG), request_timeout_s)
                op, b, l, s = head.tolist()
                if op == SHUTDOWN:
                    clients.remove(c)
                    continue
                for name, got, want in (("op", op, FORWARD), ("batch", b, batch), ("length", l, length),
                                        ("request number", s, seq)):
                    if got != want:
                        return fail(f"client {c} sent a request with {name} {got}, but {want} was agreed "
                                    f"(handshake --batch {batch} --length {length}, round {seq})")
                x = torch.zeros(batch, length, dtype=torch.long, device=device)
                n = torch.zeros(batch, dtype=torch.long, device=device)
                _wait(pg.recv([x], c, REQUEST_TAG), request_timeout_s)
                _wait(pg.recv([n], c, REQUEST_TAG), request_timeout_s)
                ids.append(x), lengths.append(n), forwarders.append(c)
            if not forwarders:
                continue
            t1 = time.perf_counter()
            logits, hidden = teacher_outputs(model, torch.cat(ids), torch.cat(lengths), output_all_hiddens)
            if hidden is not None:
                hidden = hidden.view(cfg.num_hidden_layers, len(forwarders) * batch, length, -1)
            t2 = time.perf_counter()
            phase = "sending a reply"
            for i, c in enumerate(forwarders):
                reply(c, OK)
                rows = slice(i * batch, (i + 1) * batch)
                _wait(pg.send([logits[rows].to(wire).contiguous()], c, REPLY_TAG), request_timeout_s)
                if hidden is not None:
                    h = hidden[:, rows].reshape(-1, length, hidden.shape[-1]).to(wire).contiguous()
                    _wait(pg.send([h], c, REPLY_TAG), request_timeout_s)
        except RuntimeError as e:
            return fail(f"client {c} failed while the server was {phase} (round {seq}): {e}", failed=(c,))
        seq += 1
        t_infer += t2 - t1
        t_transfer += time.perf_counter() - t0 - (t2 - t1)
        if seq % log_every == 0:
            print(f"[teacher {nccl_id_file}] round {seq}: mean inference {t_infer / log_every * 1e3:.1f} ms, "
                  f"mean transfer {t_transfer / log_every * 1e3:.1f} ms", flush=True)
            t_infer = t_transfer = 0.0
    print(f"[teacher {nccl_id_file}] all clients shut down after {seq} rounds", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Client

def _join_store(path: str, size: int, timeout_s: float):
    """Wait for the server's rendezvous file and connect to its store; a file from another run (nothing
    listens at its address, or another server with a different nonce does) is an error at the deadline."""
    deadline = time.monotonic() + timeout_s
    stale = "a rendezvous file from another run? Start this run's teacher server (it rewrites the file)"
    problem = "no rendezvous file appeared: start the teacher server with --nccl_id_file set to this path"
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                info = json.load(f)
        except FileNotFoundError:
            time.sleep(0.2)
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a teacher-server rendezvous file ({e}); delete it and restart the server")
        if info.get("protocol") != PROTOCOL:
            raise ValueError(f"{path}: protocol {info.get('protocol')!r}, expected {PROTOCOL!r} (a file from "
                             "another program or the original cupy server); delete it and restart the server")
        try:
            store = dist.TCPStore(info["host"], info["port"], None, False,
                                  _timedelta(max(0.5, min(3.0, deadline - time.monotonic()))))
            nonce = int(store.get("nonce"))
        except (RuntimeError, dist.DistError) as e:
            problem = (f"no teacher server answers at {info['host']}:{info['port']} (pid {info.get('pid')}; "
                       f"{str(e).splitlines()[0]}): {stale}")
            time.sleep(0.5)
            continue
        if nonce != info["nonce"]:
            problem = (f"its nonce {info['nonce']} differs from that of the server at {info['host']}:"
                       f"{info['port']} ({nonce}): {stale}")
            time.sleep(0.5)
            continue
        if info["size"] != size:
            raise ValueError(f"{path}: the server was started with --size {info['size']} but this trainer's group "
                             f"has size {size} (num_devices / num_groups + 1); restart one side to match")
        return store, info
    raise TeacherError(f"{path}: {problem} (waited {timeout_s:.0f}s)")


class TeacherClient:
    """A trainer's side of the teacher group: forward(input_ids, lengths) -> (fp32 logits, hidden or None)."""

    def __init__(self, nccl_id_file: str, rank: int, size: int, *, batch: int, length: int, vocab: int,
                 hidden: int, n_layers: int, pad_id: int, output_all_hiddens: bool = False,
                 logits_dtype: str = "fp32", device="cpu", backend: str = "auto", connect_timeout_s: float = 600,
                 reply_timeout_s: float = 600):
        self.device = torch.device(device)
        self.file, self.rank, self.size = nccl_id_file, rank, size
        self.batch, self.length, self.vocab, self.hidden_size = batch, length, vocab, hidden
        self.n_layers, self.output_all_hiddens = n_layers, output_all_hiddens
        self.wire, self.reply_timeout_s, self.seq, self.closed = WIRE_DTYPES[logits_dtype], reply_timeout_s, 0, False
        if not 0 <= rank < size - 1:
            raise ValueError(f"client rank {rank} outside the group of size {size} (clients are 0..{size - 2})")
        own = header_values(batch=batch, length=length, vocab=vocab, hidden=hidden, n_layers=n_layers,
                            logits_dtype=logits_dtype, output_all_hiddens=output_all_hiddens, pad_id=pad_id,
                            size=size)
        self.store, info = _join_store(nccl_id_file, size, connect_timeout_s)
        backend = _resolve_backend(backend, self.device)
        if info["backend"] != backend:
            raise ValueError(f"{nccl_id_file}: the server uses {info['backend']} but this trainer {backend} "
                             f"(device {self.device}); pass --backend {info['backend']} or run both on one kind")
        try:
            self.pg = _process_group(backend, self.store, rank, size, connect_timeout_s)
            sent = self.pg.send([own.to(self.device)], size - 1, REQUEST_TAG)
            self._status("handshake", connect_timeout_s)
            _wait(sent, connect_timeout_s)
            theirs = torch.zeros(len(HEADER), dtype=torch.long, device=self.device)
            _wait(self.pg.recv([theirs], size - 1, REPLY_TAG), connect_timeout_s)
        except RuntimeError as e:
            if isinstance(e, TeacherError):
                raise
            raise TeacherError(self._where("handshake", e)) from None
        problem = header_mismatch(theirs.cpu(), own, rank)   # both sides check
        if problem:
            raise TeacherError(f"{nccl_id_file}: {problem}")

    def _where(self, phase, e) -> str:
        return (f"teacher group {self.file}: server (rank {self.size - 1}) failed or timed out during the {phase} "
                f"of client {self.rank}, request {self.seq}: {str(e).splitlines()[0]}")

    def _status(self, phase, timeout_s):
        head = torch.zeros(4, dtype=torch.long, device=self.device)
        msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        _wait(self.pg.recv([head], self.size - 1, REPLY_TAG), timeout_s)
        _wait(self.pg.recv([msg], self.size - 1, REPLY_TAG), timeout_s)
        if int(head[0]) != OK:
            self.closed = True
            raise TeacherError(_text(msg))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        B, L = input_ids.shape
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()   # the original sent before torch's writes landed
        server = self.size - 1
        head = torch.tensor([FORWARD, B, L, self.seq], device=self.device)
        try:
            # sent without waiting: a refused request is answered by the status below instead
            sends = [self.pg.send([t], server, REQUEST_TAG) for t in (
                head, input_ids.to(self.device, torch.long).contiguous(),
                lengths.to(self.device, torch.long).contiguous())]
            self._status("reply", self.reply_timeout_s)
            for work in sends:
                _wait(work, self.reply_timeout_s)
            logits = torch.empty(B, L, self.vocab, dtype=self.wire, device=self.device)
            _wait(self.pg.recv([logits], server, REPLY_TAG), self.reply_timeout_s)
            hidden = None
            if self.output_all_hiddens:
                hidden = torch.empty(self.n_layers * B, L, self.hidden_size, dtype=self.wire, device=self.device)
                _wait(self.pg.recv([hidden], server, REPLY_TAG), self.reply_timeout_s)
        except RuntimeError as e:
            if isinstance(e, TeacherError):
                raise
            raise TeacherError(self._where("reply", e)) from None
        self.seq += 1
        return logits.float(), None if hidden is None else hidden.float()

    def shutdown(self):
        """Leave the group; the server exits 0 once every client has left."""
        if self.closed:
            return
        self.closed = True
        head = torch.tensor([SHUTDOWN, self.batch, self.length, self.seq], device=self.device)
        _wait(self.pg.send([head], self.size - 1, REQUEST_TAG), self.reply_timeout_s)


def client_for_rank(nccl_file: str, global_rank: int, world_size: int, num_groups: int, **kwargs) -> TeacherClient:
    """The original's layout: S = world/num_groups + 1, group = rank // (S-1), local = rank % (S-1); group g
    reads f"{nccl_file}_{g}"."""
    if world_size % num_groups:
        raise ValueError(f"teach_mode.num_groups {num_groups} must divide the number of trainers {world_size}")
    per_group = world_size // num_groups
    group, local = divmod(global_rank, per_group)
    return TeacherClient(f"{nccl_file}_{group}", local, per_group + 1, **kwargs)


# ---------------------------------------------------------------------------------------------------------

def main(model_id: str, batch: int, length: int, size: int, output_all_hiddens: bool = False, device_id: int = 0,
         nccl_id_file: str = "nccl.txt", logits_dtype: str = "fp32", backend: str = "auto",
         host: str = "127.0.0.1", port: int = 0, request_timeout_s: float = 1800, connect_timeout_s: float = 600):
    """Load the teacher (bf16 on a GPU, fp32 on CPU) and serve one group of trainers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.cli import check_choice, check_range
    from common.hf import check_model_folder

    for flag, value in (("--batch", batch), ("--length", length)):
        check_range(flag, value, low=1)
    check_range("--size", size, low=2)  # the server and at least one trainer
    check_choice("--logits_dtype", logits_dtype, WIRE_DTYPES)
    check_choice("--backend", backend, ("auto", "nccl", "gloo"))
    check_model_folder(model_id, "--model_id")
    device = torch.device(f"cuda:{device_id}" if torch.cuda.is_available() and backend != "gloo" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device).eval().requires_grad_(False)
    try:
        code = serve(model, batch=batch, length=length, size=size, nccl_id_file=nccl_id_file,
                     output_all_hiddens=output_all_hiddens, logits_dtype=logits_dtype,
                     pad_id=tokenizer.eos_token_id, backend=backend, host=host, port=port, device=device,
                     connect_timeout_s=connect_timeout_s, request_timeout_s=request_timeout_s)
    except Exception:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)   # gloo's threads may still hold sockets of failed peers; exit with the code regardless


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
