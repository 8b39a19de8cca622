"""The frozen teacher served to a group of trainers over torch.distributed (spec §3.2): NCCL on GPUs, gloo on CPU.

    # one server per group of trainers; the server is the last rank of its group
    python -m rwkv_llama.teacher_server --model_id DIR --batch 3 --length 2048 --size 4 \
        --output_all_hiddens --device_id 0 --nccl_id_file nccl.txt_0

Each round every active trainer sends [op, B, L, seq] then input_ids (B, L) and lengths (B); the server runs
one batched forward over the whole group and sends each its logits (B, L, V) and, with --output_all_hiddens,
its hidden states (n_layers*B, L, D), layer-major as cat(hidden_states[1:]). Unlike the original (cupy NCCL,
no handshake, no shutdown, no timeouts) a handshake checks every shape, dtype and flag, a SHUTDOWN op ends a
client, and every wait has a deadline: a dead, stopped or misbehaving peer ends every process of the group,
each with one line. The rendezvous file (JSON: protocol, host, port, size, backend, nonce) is written
atomically before the teacher loads, so trainers already waiting learn it if loading fails (the store's
"error" key and the file's "error" field); a loaded server sets "ready".
"""
import datetime
import json
import os
import queue
import secrets
import sys
import threading
import time
import traceback
from typing import Optional

import torch
import torch.distributed as dist

from common.cli import UserError
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
    """A peer of the teacher group failed, timed out or broke the protocol. Every trainer of the group gets it;
    `report` marks the one that prints it (the lowest trainer still alive), so a group says it once."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report


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


def _wait_all(works: dict, timeout_s: float) -> dict:
    """Wait for every work {(client, part): work} at once, one thread each (a gloo wait that times out closes
    the connections, so they cannot be polled): {client: error} of those that failed or did not finish within
    timeout_s, collected until a second after the first failure; empty when all finished. A wait failed only
    because another one timed out (gloo then closes every connection) is not held against its client."""
    results = queue.Queue()

    def wait(key, work):
        try:
            _wait(work, timeout_s)
            results.put((key, None))
        except RuntimeError as e:
            results.put((key, e))
    for key, work in works.items():
        threading.Thread(target=wait, args=(key, work), daemon=True).start()
    failed, deadline = {}, None
    for _ in works:
        try:
            key, error = results.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if error is not None and COLLATERAL not in str(error):
            failed.setdefault(key[0], error)
        if error is not None:
            deadline = deadline or time.monotonic() + 1.0
    return failed


COLLATERAL = "Application timeout caused pair closure"


def why_failed(e: Exception, timeout_s: Optional[float] = None) -> str:
    """A failed wait on a peer in words: it timed out, its connection closed, or the transport's first line."""
    text = str(e)
    if "imed out" in text or ("timeout" in text and COLLATERAL not in text):
        within = f" within {timeout_s:g}s" if timeout_s is not None else " in time"
        return f"no answer{within} (dead, stopped, or held up by another trainer that is)"
    if "closed" in text or "reset by peer" in text:
        return "its connection closed (the process ended)"
    return text.splitlines()[0] if text else type(e).__name__


def _clients_failed(failed: dict, timeout_s: float) -> str:
    return "; ".join(f"client {c}: {why_failed(e, timeout_s)}" for c, e in sorted(failed.items()))


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

def serve(load, *, batch: int, length: int, size: int, nccl_id_file: str, output_all_hiddens: bool = False,
          logits_dtype: str = "fp32", backend: str = "auto", host: str = "127.0.0.1", port: int = 0, device="cpu",
          connect_timeout_s: float = 600, request_timeout_s: float = 1800, log_every: int = 50) -> int:
    """Publish the rendezvous file, load the teacher with load() -> (model, pad_id), then serve size-1 clients
    until all have sent SHUTDOWN (returns 0) or one fails (returns 1, after telling the others why)."""
    device = torch.device(device)
    backend = _resolve_backend(backend, device)
    if size < 2:
        raise ValueError(f"--size {size}: the group holds the server and at least one trainer, so size >= 2")
    wire = WIRE_DTYPES[logits_dtype]
    rank, clients = size - 1, list(range(size - 1))
    store = dist.TCPStore(host, port, None, True, _timedelta(connect_timeout_s), wait_for_workers=False)
    rendezvous = dict(protocol=PROTOCOL, host=host, port=store.port, size=size, backend=backend,
                      nonce=secrets.randbits(62), pid=os.getpid())
    store.set("nonce", str(rendezvous["nonce"]))
    atomic_write_json(rendezvous, nccl_id_file)
    print(f"[teacher {nccl_id_file}] listening on {host}:{store.port}, loading the teacher, then waiting for "
          f"{size - 1} clients (batch {batch}, length {length}, {backend})", flush=True)

    def error(text):
        print(f"error: teacher server {nccl_id_file}: {text}", file=sys.stderr, flush=True)
        return 1

    def last_word(text, reporter=None):
        """The reason the group stops, in the rendezvous file: a trainer that finds its server gone reads it."""
        atomic_write_json(dict(rendezvous, error=text, reporter=reporter), nccl_id_file)

    try:
        model, pad_id = load()
    except Exception as e:      # waiting trainers read it from the store, later ones from the file
        why = f"could not load the teacher: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        store.set("error", why)
        last_word(why)
        if not isinstance(e, UserError):
            traceback.print_exc()       # a bug keeps its traceback
        return error(why)
    cfg = model.config
    own = header_values(batch=batch, length=length, vocab=model.get_output_embeddings().weight.shape[0],
                        hidden=cfg.hidden_size, n_layers=cfg.num_hidden_layers, logits_dtype=logits_dtype,
                        output_all_hiddens=output_all_hiddens, pad_id=pad_id, size=size)
    store.set("ready", "1")
    try:
        pg = _process_group(backend, store, rank, size, connect_timeout_s)
    except RuntimeError as e:
        text = f"not all {size - 1} clients joined within {connect_timeout_s:g}s: {str(e).splitlines()[0]}"
        last_word(text)
        return error(text)

    def replies(c, status, text="", report=False):
        head = torch.tensor([status, int(report), 0, 0], device=device)
        return [pg.send([head], c, REPLY_TAG), pg.send([_message(text, device)], c, REPLY_TAG)]

    def fail(text, failed=()):
        """Print the line, tell every other client why (the lowest of them reports it), return 1."""
        told = [c for c in clients if c not in failed]
        last_word(text, told[0] if told else None)
        error(text)
        try:    # after a timeout gloo has closed every connection: they find the reason in the file
            works = {(c, i): w for c in told for i, w in enumerate(
                replies(c, ERROR, f"teacher server {nccl_id_file}: {text}", c == told[0]))}
            _wait_all(works, 10)
        except RuntimeError:
            pass
        return 1

    # handshake: every client's header first (a client blocked in its send could not hear an error), then ours
    headers = {c: torch.zeros(len(HEADER), dtype=torch.long, device=device) for c in clients}
    failed = _wait_all({(c, 0): pg.recv([headers[c]], c, REQUEST_TAG) for c in clients}, connect_timeout_s)
    if failed:
        return fail(f"the handshake failed: {_clients_failed(failed, connect_timeout_s)}", failed)
    for c in clients:
        problem = header_mismatch(own, headers[c].cpu(), c)
        if problem:
            return fail(problem)
    failed = _wait_all({(c, i): w for c in clients for i, w in enumerate(
        replies(c, OK) + [pg.send([own.to(device)], c, REPLY_TAG)])}, connect_timeout_s)
    if failed:
        return fail(f"the handshake failed: {_clients_failed(failed, connect_timeout_s)}", failed)
    print(f"[teacher {nccl_id_file}] handshake done with {len(clients)} clients", flush=True)

    seq, t_infer, t_transfer = 0, 0.0, 0.0
    while clients:
        t0 = time.perf_counter()
        heads = {c: torch.zeros(4, dtype=torch.long, device=device) for c in clients}
        failed = _wait_all({(c, 0): pg.recv([heads[c]], c, REQUEST_TAG) for c in clients}, request_timeout_s)
        if failed:
            return fail(f"waiting for the requests of round {seq}: {_clients_failed(failed, request_timeout_s)}",
                        failed)
        forwarders = []
        for c in list(clients):
            op, b, l, s = heads[c].tolist()
            if op == SHUTDOWN:
                clients.remove(c)
                continue
            for name, got, want in (("op", op, FORWARD), ("batch", b, batch), ("length", l, length),
                                    ("request number", s, seq)):
                if got != want:
                    return fail(f"client {c} sent a request with {name} {got}, but {want} was agreed "
                                f"(handshake --batch {batch} --length {length}, round {seq})")
            forwarders.append(c)
        if not forwarders:
            continue
        ids = {c: torch.zeros(batch, length, dtype=torch.long, device=device) for c in forwarders}
        lengths = {c: torch.zeros(batch, dtype=torch.long, device=device) for c in forwarders}
        failed = _wait_all({(c, i): pg.recv([t[c]], c, REQUEST_TAG) for c in forwarders
                            for i, t in enumerate((ids, lengths))}, request_timeout_s)
        if failed:
            return fail(f"receiving the inputs of round {seq}: {_clients_failed(failed, request_timeout_s)}", failed)
        t1 = time.perf_counter()
        try:
            logits, hidden = teacher_outputs(model, torch.cat([ids[c] for c in forwarders]),
                                             torch.cat([lengths[c] for c in forwarders]), output_all_hiddens)
        except Exception as e:      # e.g. out of memory: the clients hear why, then the traceback follows
            fail(f"the teacher's forward failed in round {seq}: {str(e).splitlines()[0] if str(e) else e!r}")
            raise
        if hidden is not None:
            hidden = hidden.view(cfg.num_hidden_layers, len(forwarders) * batch, length, -1)
        t2 = time.perf_counter()
        sends = {}
        for i, c in enumerate(forwarders):
            rows = slice(i * batch, (i + 1) * batch)
            tensors = [logits[rows].to(wire).contiguous()]
            if hidden is not None:
                tensors.append(hidden[:, rows].reshape(-1, length, hidden.shape[-1]).to(wire).contiguous())
            for k, w in enumerate(replies(c, OK) + [pg.send([t], c, REPLY_TAG) for t in tensors]):
                sends[(c, k)] = w
        failed = _wait_all(sends, request_timeout_s)
        if failed:
            return fail(f"sending the replies of round {seq}: {_clients_failed(failed, request_timeout_s)}", failed)
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

def _load_error(path: str, info: dict, report: bool) -> TeacherError:
    return TeacherError(f"teacher server {path} (pid {info.get('pid')}): {info['error']}", report)


def _join_store(path: str, size: int, timeout_s: float, report: bool):
    """Wait for the server's rendezvous file and connect to its store; a file from another run (nothing
    listens at its address, or another server with a different nonce does) is an error at the deadline.
    Then wait until the server has loaded its teacher ("ready"), or learn why it could not."""
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
            raise UserError(f"{path}: not a teacher-server rendezvous file ({e}); delete it and restart the server")
        if info.get("protocol") != PROTOCOL:
            raise UserError(f"{path}: protocol {info.get('protocol')!r}, expected {PROTOCOL!r} (a file from "
                            "another program or the original cupy server); delete it and restart the server")
        if info.get("error"):
            raise _load_error(path, info, report)
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
            raise UserError(f"{path}: the server was started with --size {info['size']} but this trainer's group "
                            f"has size {size} (num_devices / num_groups + 1); restart one side to match")
        while time.monotonic() < deadline:
            try:
                if store.check(["error"]):
                    raise _load_error(path, dict(info, error=store.get("error").decode()), report)
                if store.check(["ready"]):
                    return store, info
            except (RuntimeError, dist.DistError) as e:
                if isinstance(e, TeacherError):
                    raise
                try:    # the server went away: its last word is in the file, if it had one
                    with open(path) as f:
                        info = dict(info, **json.load(f))
                except (OSError, ValueError):
                    pass
                if info.get("error"):
                    raise _load_error(path, info, report) from None
                raise TeacherError(f"teacher server {path} (pid {info.get('pid')}) ended before its teacher was "
                                   f"loaded ({str(e).splitlines()[0]})", report) from None
            time.sleep(0.2)
        problem = "the server did not finish loading its teacher (raise teach_mode.connect_timeout_s?)"
    raise TeacherError(f"{path}: {problem} (waited {timeout_s:.0f}s)", report)


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
        self.wire, self.seq, self.closed = WIRE_DTYPES[logits_dtype], 0, False
        self.connect_timeout_s, self.reply_timeout_s = connect_timeout_s, reply_timeout_s
        if not 0 <= rank < size - 1:
            raise ValueError(f"client rank {rank} outside the group of size {size} (clients are 0..{size - 2})")
        own = header_values(batch=batch, length=length, vocab=vocab, hidden=hidden, n_layers=n_layers,
                            logits_dtype=logits_dtype, output_all_hiddens=output_all_hiddens, pad_id=pad_id,
                            size=size)
        self.store, info = _join_store(nccl_id_file, size, connect_timeout_s, report=rank == 0)
        self.nonce = info["nonce"]
        backend = _resolve_backend(backend, self.device)
        if info["backend"] != backend:
            raise UserError(f"{nccl_id_file}: the server uses {info['backend']} but this trainer {backend} "
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
            raise self._where("handshake", e) from None
        problem = header_mismatch(theirs.cpu(), own, rank)   # both sides check
        if problem:
            raise TeacherError(f"{nccl_id_file}: {problem}", self.rank == 0)

    def _where(self, phase, e) -> TeacherError:
        """Why the server failed this client: the reason it left in the rendezvous file (the client it names
        reports it), else what this client saw (every client sees it; client 0 reports it)."""
        try:
            with open(self.file) as f:
                info = json.load(f)
        except (OSError, ValueError):
            info = {}
        if info.get("error") and info.get("nonce") == self.nonce:
            reporter = info.get("reporter")
            return TeacherError(f"teacher server {self.file} (pid {info.get('pid')}): {info['error']}",
                                self.rank == (0 if reporter is None else reporter))
        timeout_s = self.connect_timeout_s if phase == "handshake" else self.reply_timeout_s
        return TeacherError(f"teacher server {self.file} (rank {self.size - 1}): {why_failed(e, timeout_s)}, in the "
                            f"{phase} of client {self.rank}, request {self.seq}", self.rank == 0)

    def _status(self, phase, timeout_s):
        head = torch.zeros(4, dtype=torch.long, device=self.device)
        msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        _wait(self.pg.recv([head], self.size - 1, REPLY_TAG), timeout_s)
        _wait(self.pg.recv([msg], self.size - 1, REPLY_TAG), timeout_s)
        if int(head[0]) != OK:
            self.closed = True
            raise TeacherError(_text(msg), report=bool(head[1]))

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
            raise self._where("reply", e) from None
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
        raise UserError(f"teach_mode.num_groups {num_groups} must divide the number of trainers {world_size}")
    per_group = world_size // num_groups
    group, local = divmod(global_rank, per_group)
    return TeacherClient(f"{nccl_file}_{group}", local, per_group + 1, **kwargs)


# ---------------------------------------------------------------------------------------------------------

def main(model_id: str, batch: int, length: int, size: int, output_all_hiddens: bool = False, device_id: int = 0,
         nccl_id_file: str = "nccl.txt", logits_dtype: str = "fp32", backend: str = "auto",
         host: str = "127.0.0.1", port: int = 0, request_timeout_s: float = 1800, connect_timeout_s: float = 600):
    """Load the teacher (bf16 on a GPU, fp32 on CPU) and serve one group of trainers. Exits 0 when every
    trainer has left, 1 with one line when loading or a peer failed (a bug keeps its traceback)."""
    from common import hf
    from common.cli import check_choice, check_range

    for flag, value in (("--batch", batch), ("--length", length)):
        check_range(flag, value, low=1)
    check_range("--size", size, low=2)  # the server and at least one trainer
    check_choice("--logits_dtype", logits_dtype, WIRE_DTYPES)
    check_choice("--backend", backend, ("auto", "nccl", "gloo"))
    device = torch.device(f"cuda:{device_id}" if torch.cuda.is_available() and backend != "gloo" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def load():     # inside serve: trainers already waiting learn that it failed (a missing folder first of all)
        tokenizer = hf.load_tokenizer(model_id, flag="--model_id")
        model = hf.load_model(model_id, dtype="bfloat16" if device.type == "cuda" else "float32", device=device,
                              frozen=True, flag="--model_id")
        return model, tokenizer.eos_token_id
    try:
        code = serve(load, batch=batch, length=length, size=size, nccl_id_file=nccl_id_file,
                     output_all_hiddens=output_all_hiddens, logits_dtype=logits_dtype, backend=backend, host=host,
                     port=port, device=device, connect_timeout_s=connect_timeout_s,
                     request_timeout_s=request_timeout_s)
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)   # gloo's threads may still hold sockets of failed peers; exit with the code regardless


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
