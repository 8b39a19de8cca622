"""rwkv_llama/teacher_server.py for real: a server process and client processes on gloo over loopback, each
bounded in time and killed in the end. The in-process teacher is the oracle."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rwkv_llama.teacher_server import InProcessTeacher, TeacherClient, TeacherError, teacher_outputs
from tests.tiny import save_tiny, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, L, ROUNDS = 2, 8, 3
TIMEOUT = 120            # nothing here waits for it to pass: a loaded machine may stall a healthy peer for a while
CONNECT_TIMEOUT = 300    # a fresh interpreter may take a minute to import torch on a busy machine


def client_inputs(rank: int, round_: int):
    g = torch.Generator().manual_seed(100 * rank + round_)
    ids = torch.randint(4, 100, (B, L), generator=g)
    lengths = torch.tensor([L, L - 3 - rank])
    return ids, lengths


def client_main(id_file: str, rank: int, size: int, out: str, behaviour: str = "normal", hiddens: int = 1,
                logits_dtype: str = "fp32"):
    """One trainer: ROUNDS requests, results saved to `out`, then SHUTDOWN. Run as its own process."""
    model = tiny_model("llama")
    try:
        client = TeacherClient(id_file, rank, size, batch=B, length=L, vocab=model.config.vocab_size,
                               hidden=model.config.hidden_size, n_layers=model.config.num_hidden_layers,
                               pad_id=1, output_all_hiddens=bool(hiddens), backend="gloo", logits_dtype=logits_dtype,
                               connect_timeout_s=CONNECT_TIMEOUT, reply_timeout_s=TIMEOUT)
        results = []
        for r in range(ROUNDS):
            ids, lengths = client_inputs(rank, r)
            if behaviour == "wrong_shape" and r == 1:
                ids, lengths = ids[:, :-1], lengths           # one position short
            logits, hidden = client.forward(ids, lengths)
            results.append(dict(logits=logits, hidden=hidden))
        client.shutdown()
        torch.save(results, out)
    except TeacherError as e:
        print(f"TeacherError: {e}", file=sys.stderr, flush=True)
        return 3
    return 0


def _in_child(fn, log_path, *args):
    """Run fn(*args) in a forked process (torch is already imported: starts in milliseconds, unlike a fresh
    interpreter on a busy machine), its output to log_path; the exit code is fn's."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1), os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
    try:
        code = fn(*args)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code or 0)


def serve_main(model_dir, id_file, size, hiddens, logits_dtype="fp32"):
    from transformers import AutoModelForCausalLM
    from rwkv_llama.teacher_server import serve
    return serve(lambda: (AutoModelForCausalLM.from_pretrained(model_dir).eval(), 1), batch=B, length=L, size=size,
                 nccl_id_file=id_file, output_all_hiddens=bool(hiddens), backend="gloo",
                 connect_timeout_s=CONNECT_TIMEOUT, request_timeout_s=TIMEOUT, logits_dtype=logits_dtype)


def run_group(tmp_path, behaviours, server_hiddens=1, client_hiddens=1, server_cli=False, logits_dtype="fp32",
              **teacher_overrides):
    """Start one server and len(behaviours) clients; wait for all (bounded); return exit codes and logs.
    With server_cli the server is `python -m rwkv_llama.teacher_server` with the original's flags."""
    import multiprocessing as mp
    fork = mp.get_context("fork")
    model_dir = save_tiny("llama", tmp_path / "teacher", **teacher_overrides)
    id_file = str(tmp_path / "nccl.txt_0")
    size = len(behaviours) + 1
    logs = [tmp_path / "server.log"] + [tmp_path / f"client{r}.log" for r in range(len(behaviours))]
    if server_cli:
        flags = ["--model_id", model_dir, "--batch", B, "--length", L, "--size", size, "--nccl_id_file", id_file,
                 "--device_id", 0, "--backend", "gloo", "--request_timeout_s", TIMEOUT, "--connect_timeout_s",
                 CONNECT_TIMEOUT] + (["--output_all_hiddens"] if server_hiddens else [])
        server = subprocess.Popen([sys.executable, "-m", "rwkv_llama.teacher_server", *map(str, flags)], cwd=ROOT,
                                  stdout=open(logs[0], "w"), stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    else:
        server = fork.Process(target=_in_child, args=(serve_main, logs[0], model_dir, id_file, size, server_hiddens,
                                                      logits_dtype))
        server.start()
    clients = [fork.Process(target=_in_child, args=(client_main, logs[1 + r], id_file, r, size,
                                                     str(tmp_path / f"out{r}.pt"), behaviour, client_hiddens,
                                                     logits_dtype))
               for r, behaviour in enumerate(behaviours)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + CONNECT_TIMEOUT + 3 * TIMEOUT
    try:
        if server_cli:
            codes = [server.wait(timeout=max(1, deadline - time.monotonic()))]
        else:
            server.join(max(1, deadline - time.monotonic()))
            codes = [server.exitcode]
        for c in clients:
            c.join(max(1, deadline - time.monotonic()))
            codes.append(c.exitcode)
    finally:
        for p in [server, *clients]:            # nothing is left running, whatever happened
            if (p.poll() if server_cli and p is server else p.exitcode) is None:
                p.kill()
                p.wait() if p is server and server_cli else p.join()
    return codes, [open(f).read() for f in logs], model_dir


def test_two_clients_get_exactly_what_the_in_process_teacher_gives_and_all_exit_0(tmp_path):
    codes, logs, model_dir = run_group(tmp_path, ["normal", "normal"], server_cli=True)
    assert codes == [0, 0, 0], logs
    from transformers import AutoModelForCausalLM
    teacher = InProcessTeacher(AutoModelForCausalLM.from_pretrained(model_dir), output_all_hiddens=True)
    n = teacher.model.config.num_hidden_layers
    got = [torch.load(tmp_path / f"out{r}.pt", weights_only=True) for r in range(2)]
    for r_ in range(ROUNDS):
        # the server's batched forward over the gathered group, computed in-process: equal bit for bit
        inputs = [client_inputs(rank, r_) for rank in range(2)]
        logits, hidden = teacher.forward(torch.cat([x for x, _ in inputs]), torch.cat([n_ for _, n_ in inputs]))
        hidden = hidden.view(n, 2 * B, L, -1)
        for rank in range(2):
            rows = slice(rank * B, (rank + 1) * B)
            torch.testing.assert_close(got[rank][r_]["logits"], logits[rows], atol=0, rtol=0)
            torch.testing.assert_close(got[rank][r_]["hidden"], hidden[:, rows].reshape(n * B, L, -1), atol=0,
                                       rtol=0)
            # and what the client's own batch gives in-process (same maths, another batch size)
            own_logits, own_hidden = teacher.forward(*inputs[rank])
            torch.testing.assert_close(got[rank][r_]["logits"], own_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[rank][r_]["hidden"], own_hidden, atol=1e-5, rtol=1e-5)
    assert "all clients shut down" in logs[0]


def test_bf16_wire_carries_the_teachers_outputs_rounded_to_bf16_and_the_client_returns_fp32(tmp_path):
    codes, logs, model_dir = run_group(tmp_path, ["normal"], logits_dtype="bf16")
    assert codes == [0, 0], logs
    from transformers import AutoModelForCausalLM
    teacher = InProcessTeacher(AutoModelForCausalLM.from_pretrained(model_dir), output_all_hiddens=True)
    got = torch.load(tmp_path / "out0.pt", weights_only=True)
    for r_ in range(ROUNDS):
        logits, hidden = teacher.forward(*client_inputs(0, r_))
        assert got[r_]["logits"].dtype == got[r_]["hidden"].dtype == torch.float32
        torch.testing.assert_close(got[r_]["logits"], logits.to(torch.bfloat16).float(), atol=0, rtol=0)
        torch.testing.assert_close(got[r_]["hidden"], hidden.to(torch.bfloat16).float(), atol=0, rtol=0)
        assert not torch.equal(got[r_]["logits"], logits)  # the rounding did happen


def test_a_client_sending_a_wrong_shape_stops_everyone_with_the_field_named(tmp_path):
    codes, logs, _ = run_group(tmp_path, ["wrong_shape", "normal"])
    assert codes == [1, 3, 3], logs
    for log in logs:
        assert "client 0 sent a request with length 7, but 8 was agreed" in log


def test_handshake_mismatch_names_the_field_and_the_flag(tmp_path):
    codes, logs, _ = run_group(tmp_path, ["normal", "normal"], server_hiddens=0)
    assert codes == [1, 3, 3], logs
    assert "output_all_hiddens 1 but the teacher server has 0" in logs[1]
    assert "--output_all_hiddens" in logs[1]


def test_a_teacher_with_another_vocabulary_stops_the_handshake_with_both_sizes(tmp_path):
    codes, logs, _ = run_group(tmp_path, ["normal"], vocab_size=256)
    assert codes == [1, 3], logs
    assert "student vocabulary 128 != teacher vocabulary 256" in logs[1]


def test_a_rendezvous_file_from_another_run_is_a_clear_error(tmp_path):
    stale = tmp_path / "nccl.txt_0"
    from tests.distributed import free_port
    stale.write_text(json.dumps(dict(protocol="kdzoo-rwkv-teacher/1", host="127.0.0.1", port=free_port(), size=2,
                                     backend="gloo", nonce=123, pid=1)))
    with pytest.raises(TeacherError, match="a rendezvous file from another run"):
        TeacherClient(str(stale), 0, 2, batch=B, length=L, vocab=128, hidden=32, n_layers=2, pad_id=1,
                      backend="gloo", connect_timeout_s=2)
    stale.write_text('{"nccl_id": [1, 2, 3]}')      # the original cupy server's file
    with pytest.raises(ValueError, match="protocol None"):
        TeacherClient(str(stale), 0, 2, batch=B, length=L, vocab=128, hidden=32, n_layers=2, pad_id=1,
                      backend="gloo", connect_timeout_s=2)


def test_in_process_teacher_masks_by_length_not_by_eos():
    model = tiny_model("llama")
    ids = torch.full((1, 6), 1)                       # every id is eos: the original would mask all of them
    logits, _ = teacher_outputs(model, ids, torch.tensor([6]), False)
    torch.testing.assert_close(logits, model(ids).logits)


def grouped_client_main(prefix: str, rank: int, out: str):
    from rwkv_llama.teacher_server import client_for_rank
    model = tiny_model("llama")
    client = client_for_rank(prefix, rank, 2, 2, batch=B, length=L, vocab=model.config.vocab_size,
                             hidden=model.config.hidden_size, n_layers=model.config.num_hidden_layers, pad_id=1,
                             backend="gloo", connect_timeout_s=CONNECT_TIMEOUT, reply_timeout_s=TIMEOUT)
    logits, _ = client.forward(*client_inputs(rank, 0))
    client.shutdown()
    torch.save(logits, out)
    return 0


def test_two_servers_serve_two_groups_as_the_original_layout(tmp_path):
    import multiprocessing as mp
    fork = mp.get_context("fork")
    model_dir = save_tiny("llama", tmp_path / "teacher")
    prefix = str(tmp_path / "nccl.txt")
    procs = [fork.Process(target=_in_child, args=(serve_main, tmp_path / f"server{g}.log", model_dir,
                                                   f"{prefix}_{g}", 2, 0)) for g in range(2)]
    procs += [fork.Process(target=_in_child, args=(grouped_client_main, tmp_path / f"client{r}.log", prefix, r,
                                                    str(tmp_path / f"out{r}.pt"))) for r in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(CONNECT_TIMEOUT + TIMEOUT)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
    from transformers import AutoModelForCausalLM
    teacher = InProcessTeacher(AutoModelForCausalLM.from_pretrained(model_dir))
    for r in range(2):
        logits, _ = teacher.forward(*client_inputs(r, 0))
        torch.testing.assert_close(torch.load(tmp_path / f"out{r}.pt", weights_only=True), logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Faults, for real: `python -m rwkv_llama.teacher_server` and two `python -m rwkv_llama.train` trainers (DDP over
# gloo, started as torchrun starts them). Once the trainers have logged FAULT_STEP steps one process is killed
# (SIGKILL) or stopped (SIGSTOP); every other process must end with exit code 1 and one line, within the timeout.

FAULT_TIMEOUT = 30   # the server's --request_timeout_s and the trainers' teach_mode.reply_timeout_s: a healthy
                     # step must fit in it, on a machine loaded 15-fold (10 s did not, once in 6 runs)
MARGIN = 60          # exiting on a loaded machine, the server's last words to the others (up to 10 s)
FAULT_STEP = 2
C4 = os.path.join(ROOT, "data/rwkv_llama/c4_standin")


class Group:
    """A teacher server and two trainers as the real command lines; logs and outputs under `root`."""

    def __init__(self, root, teacher, server_model_id=None):
        from tests.distributed import rendezvous_env
        self.root, self.metrics = root, root / "out" / "metrics.jsonl"
        id_file = str(root / "nccl.txt_0")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        self._rendezvous = rendezvous_env(2)
        ddp = self._rendezvous.__enter__()
        self.procs = {"server": self._start("server", env, "-m", "rwkv_llama.teacher_server", "--model_id",
                                            server_model_id or teacher, "--batch", 4, "--length", 32, "--size", 3,
                                            "--output_all_hiddens", "--nccl_id_file", id_file, "--backend", "gloo",
                                            "--request_timeout_s", FAULT_TIMEOUT, "--connect_timeout_s", 300)}
        for r in range(2):
            self.procs[f"trainer{r}"] = self._start(
                f"trainer{r}", dict(ddp, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RANK=str(r), LOCAL_RANK=str(r)),
                "-m", "rwkv_llama.train", "--model_id", teacher, "--layers", "[0,1]", "--is_client", "true",
                "--nccl_file", str(root / "nccl.txt"), "--is_hidden_align", "true", "--c4_data", C4,
                "--languages", "[en,gsm8k]", "--max_seq_length", 32, "--micro_bsz", 4, "--head_size", 8,
                "--chunk_len", 8, "--max_steps", 100000, "--log_every_n_steps", 100000, "--connect_timeout_s", 300,
                "--reply_timeout_s", FAULT_TIMEOUT, "--output_dir", str(root / "out"))

    def _start(self, name, env, *argv):
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=env, stdout=open(
            self.root / f"{name}.out", "w"), stderr=open(self.root / f"{name}.err", "w"))

    def wait_for_steps(self, n):
        """Until rank 0 has logged n steps (complete lines of metrics.jsonl); every process must still run."""
        deadline = time.monotonic() + 600
        while not (self.metrics.exists() and self.metrics.read_bytes().count(b"\n") >= n):
            ended = {k: p.poll() for k, p in self.procs.items() if p.poll() is not None}
            assert not ended and time.monotonic() < deadline, f"{ended}\n{self.tails()}"
            time.sleep(0.1)

    def signal(self, name, sig):
        self.procs[name].send_signal(sig)
        return time.monotonic()

    def wait_ended(self, names, since, limit):
        """Wait for the named processes (at most until since + limit); returns {name: seconds after `since`}."""
        ended = {}
        while len(ended) < len(names) and time.monotonic() < since + limit:
            for name in names:
                if name not in ended and self.procs[name].poll() is not None:
                    ended[name] = time.monotonic() - since
            time.sleep(0.05)
        assert len(ended) == len(names), f"still running after {limit}s: {set(names) - set(ended)}\n{self.tails()}"
        return ended

    def stderr(self):
        return {name: (self.root / f"{name}.err").read_text() for name in self.procs}

    def tails(self):
        """The last lines of every process's stderr, for an assertion message."""
        return "\n".join(f"--- {name}:\n" + "\n".join(text.splitlines()[-12:]) for name, text in self.stderr().items())

    def codes(self):
        """Exit codes (minus the signal for a killed process), None for one still running (stopped)."""
        deadline = time.monotonic() + 60
        for p in self.procs.values():          # a killed process is reaped as soon as the kernel ends it
            while p.poll() is None and p.returncode is None and time.monotonic() < deadline and not self._stopped(p):
                time.sleep(0.05)
        return {name: p.poll() for name, p in self.procs.items()}

    @staticmethod
    def _stopped(p):
        with open(f"/proc/{p.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    def close(self):
        for p in self.procs.values():          # nothing is left running (SIGKILL ends a stopped process too)
            if p.poll() is None:
                p.kill()
                p.wait()
        self._rendezvous.__exit__(None, None, None)


def one_error_line(text):
    """The one error line of a process's stderr (asserting there is exactly one and no traceback)."""
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def silent(text):
    return not [line for line in text.splitlines() if "error" in line.lower()] and "Traceback" not in text


@pytest.fixture(scope="module")
def fault_teacher(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("fault_teacher") / "teacher")


@pytest.fixture
def group(tmp_path, fault_teacher, request):
    g = Group(tmp_path, fault_teacher, **getattr(request, "param", {}))
    yield g
    g.close()


@pytest.mark.parametrize("group", [dict(server_model_id="/nonexistent/teacher")], indirect=True)
def test_a_server_that_cannot_load_its_teacher_ends_every_trainer_with_one_line(group):
    t0 = time.monotonic()
    group.wait_ended(["server", "trainer0", "trainer1"], t0, 600)
    err = group.stderr()
    assert group.codes() == dict(server=1, trainer0=1, trainer1=1), err
    assert "could not load the teacher: --model_id /nonexistent/teacher" in one_error_line(err["server"])
    line = one_error_line(err["trainer0"])
    assert "teacher server" in line and "could not load the teacher: --model_id /nonexistent/teacher" in line
    assert silent(err["trainer1"])                 # the group's first trainer says it, once


def test_a_killed_server_ends_every_trainer_with_one_line(group):
    group.wait_for_steps(FAULT_STEP)
    ended = group.wait_ended(["trainer0", "trainer1"], group.signal("server", signal.SIGKILL), MARGIN)
    err = group.stderr()
    assert group.codes() == dict(server=-signal.SIGKILL, trainer0=1, trainer1=1), (ended, err)
    assert "its connection closed" in one_error_line(err["trainer0"]) and silent(err["trainer1"])


def test_a_stopped_server_ends_every_trainer_with_one_line_after_the_timeout(group):
    group.wait_for_steps(FAULT_STEP)
    ended = group.wait_ended(["trainer0", "trainer1"], group.signal("server", signal.SIGSTOP), FAULT_TIMEOUT + MARGIN)
    err = group.stderr()
    assert group.codes() == dict(server=None, trainer0=1, trainer1=1), (ended, err)
    # both trainers wait on the server with the same deadline: trainer0 names its own timeout, or trainer1's
    # timeout reaches it first through their data-parallel group (the same cause, named as such)
    line = one_error_line(err["trainer0"])
    assert f"no answer within {FAULT_TIMEOUT}s" in line or \
        "another trainer of this data-parallel group ended or stopped (no answer in time" in line, line
    assert silent(err["trainer1"])
    assert min(ended.values()) > FAULT_TIMEOUT - 1          # they waited for it, as they should


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_trainer_ends_the_server_and_the_other_trainer_with_one_line(group, victim):
    group.wait_for_steps(FAULT_STEP)
    other = f"trainer{1 - victim}"
    ended = group.wait_ended(["server", other], group.signal(f"trainer{victim}", signal.SIGKILL), MARGIN)
    err = group.stderr()
    assert group.codes() == {"server": 1, other: 1, f"trainer{victim}": -signal.SIGKILL}, (ended, err)
    assert f"client {victim}: its connection closed" in one_error_line(err["server"])
    line = one_error_line(err[other])        # relayed by the server, or seen in a collective with the victim
    assert f"client {victim}: its connection closed" in line or "another trainer of this data-parallel group" in line


def test_a_stopped_trainer_ends_the_server_and_the_other_trainer_with_one_line_after_the_timeout(group):
    group.wait_for_steps(FAULT_STEP)
    ended = group.wait_ended(["server", "trainer0"], group.signal("trainer1", signal.SIGSTOP),
                             FAULT_TIMEOUT + MARGIN)
    err = group.stderr()
    assert group.codes() == dict(server=1, trainer0=1, trainer1=None), (ended, err)
    assert f"client 1: no answer within {FAULT_TIMEOUT}s" in one_error_line(err["server"])
    line = one_error_line(err["trainer0"])
    # trainer0's own reply deadline and the server's wait on client 1 are the same length, so either may end it
    # first: it reads the server's reason, or its collective's, or it names its own timeout and the likely cause
    assert "client 1: no answer" in line or "another trainer of this data-parallel group" in line or \
        f"no answer within {FAULT_TIMEOUT}s (dead, stopped, or held up by another trainer that is)" in line
