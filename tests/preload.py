"""`python -m blip_recipes.cli ARGS` for run_cli and signal_at without importing torch again each time: a server
started once per test session imports torch and libraries that read none of the environment a test passes
(PRELOADED_MODULES), then forks a child per command. The child takes the command's working directory, environment,
output pipes (and with signal_at its own session and the signal's default disposition), and only then imports
transformers, huggingface_hub, datasets, accelerate, peft and blip_recipes, which read HF_ENDPOINT, HF_HUB_OFFLINE,
HF_HUB_CACHE ... at import as they do in a new interpreter. About 3-4 s of the 6-8 s a new interpreter spends
importing, for each of the suite's CLI runs.

Used only for an environment that differs from the server's in ROUTED keys alone; anything read by the interpreter
or by the preloaded libraries at start (PYTHONPATH, locale, thread counts) gets a new interpreter, as do launchers,
file-size limits (a preexec_fn) and everything with BLIP_RECIPES_TEST_PRELOAD=0.

Protocol, over a Unix socket: the client sends one JSON line {args, cwd, env, session, default_signal} with its stdout
and stderr pipes' write ends (SCM_RIGHTS); the server forks a keeper, which forks the command's process, sends
{"pid": N}, waits for it and sends {"code": exit code}.
"""

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PRELOADED_MODULES = ["torch", "torch.distributed.tensor", "torch._dynamo", "numpy", "PIL.Image", "pyarrow", "pandas",
                     "sympy"]  # fmt: skip
# Read at import by none of PRELOADED_MODULES. pytest sets PYTEST_CURRENT_TEST for each test; torch sets the last two
# in the suite's process when it first uses inductor or asks for CUDA, and reads them when used, not at import.
ROUTED = ("HF_", "BLIP_RECIPES_", "ACCELERATE_", "TOKENIZERS_PARALLELISM", "PYTHONUNBUFFERED", "PYTEST_CURRENT_TEST",
          "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK")  # fmt: skip


class Preloaded:
    """The server, started on first use; `run` answers as subprocess.run(capture_output=True, text=True)."""

    def __init__(self):
        self.process, self.path, self.lock, self.environment = None, None, threading.Lock(), None

    def routable(self, env: dict) -> bool:
        """Whether a command with environment `env` may run in a child of the server: the server's environment
        (this process's when it has not started) but for ROUTED keys."""
        if os.environ.get("BLIP_RECIPES_TEST_PRELOAD", "1") == "0":
            return False
        started = self.environment if self.environment is not None else dict(os.environ)
        changed = {key for key in set(env) | set(started) if env.get(key) != started.get(key)}
        blocking = sorted(key for key in changed if not key.startswith(ROUTED))
        if blocking and os.environ.get("BLIP_RECIPES_TEST_PRELOAD_LOG"):  # a file: why each new interpreter
            with open(os.environ["BLIP_RECIPES_TEST_PRELOAD_LOG"], "a", encoding="utf-8") as log:
                log.write(f"a new interpreter for {blocking}\n")
        return not blocking

    def _start(self):
        folder = tempfile.mkdtemp(prefix="blip-preload-")
        self.path, log = os.path.join(folder, "socket"), os.path.join(folder, "server.log")
        self.environment = dict(os.environ)
        with open(log, "wb") as errors:  # the server holds none of the suite's output open
            self.process = subprocess.Popen([sys.executable, "-u", __file__, self.path, str(os.getpid())],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                            env=self.environment)  # fmt: skip
        atexit.register(self.stop)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                with open(log, encoding="utf-8", errors="replace") as errors:
                    raise RuntimeError(f"the preloaded interpreter did not start:\n{errors.read()[-3000:]}")
            time.sleep(0.05)

    def _launch(self, args, cwd, env, merged: bool, session: bool = False, default_signal: int | None = None):
        """Send the command; (its process, its stdout's read end, its stderr's read end or None when `merged`)."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        out_read, out_write = os.pipe()
        err_read, err_write = (None, out_write) if merged else os.pipe()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self.path)
            request = {"args": [str(arg) for arg in args], "cwd": str(cwd), "env": env, "session": session,
                       "default_signal": default_signal}  # fmt: skip
            socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [out_write, err_write])
        finally:
            os.close(out_write)
            if not merged:
                os.close(err_write)
        return PreloadedProcess(args, connection), out_read, err_read

    def run(self, args, cwd, env, timeout) -> subprocess.CompletedProcess | None:
        """The command's outcome, or None when `env` is not routable (run it in a new interpreter)."""
        with self.lock:
            if not self.routable(env):
                return None
            process, out_read, err_read = self._launch(args, cwd, env, merged=False)
        captured = {}

        def drain(fd, key):
            with os.fdopen(fd, "rb") as pipe:
                captured[key] = pipe.read()

        readers = [threading.Thread(target=drain, args=pair) for pair in ((out_read, "out"), (err_read, "err"))]
        for reader in readers:
            reader.start()
        try:
            code = process.wait(timeout)
        finally:
            for reader in readers:
                reader.join()
        decode = lambda data: data.decode("utf-8", errors="replace")  # noqa: E731 -- as text=True decodes
        return subprocess.CompletedProcess(args, code, decode(captured["out"]), decode(captured["err"]))

    def popen(self, args, cwd, env, session: bool, default_signal: int) -> "PreloadedProcess | None":
        """The command started with stderr into stdout (text, read as it comes), in a session of its own with
        `session`, `default_signal` at its default disposition; None when `env` is not routable."""
        with self.lock:
            if not self.routable(env):
                return None
            process, out_read, _ = self._launch(args, cwd, env, merged=True, session=session,
                                                default_signal=default_signal)  # fmt: skip
        process.stdout = os.fdopen(out_read, "r", encoding="utf-8", errors="replace")
        return process

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


class PreloadedProcess:
    """A command run by the server, answering as much of subprocess.Popen as the tests use."""

    def __init__(self, args, connection: socket.socket):
        self.args, self.connection, self.returncode, self.stdout = args, connection, None, None
        self.buffer = b""
        self.pid = json.loads(self._line(None))["pid"]

    def _line(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            self.connection.settimeout(left)
            try:
                data = self.connection.recv(4096)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            if not data:
                raise RuntimeError("the preloaded interpreter's keeper ended without an exit code")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                line = self._line(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self._line(None)
                raise
            self.returncode = json.loads(line)["code"]
            self.connection.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        rest = self.stdout.read() if self.stdout is not None else ""
        self.wait(timeout)
        return rest, None


def _serve(path: str, client: int) -> tuple[dict, list[int]]:
    """Accept commands until this process is the child that runs one: (the request, its stdout/stderr fds). Ends
    when the process that started it (`client`, the test session) has."""
    for name in PRELOADED_MODULES:
        __import__(name)
    early = [name for name in ("transformers", "huggingface_hub", "datasets", "accelerate", "blip_recipes")
             if name in sys.modules]  # fmt: skip
    assert not early, f"imported before the environment is in place: {early}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the client waits for the name: it appears once the server listens
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers are reaped by the kernel
    server.settimeout(1.0)
    while True:
        try:
            connection, _ = server.accept()
        except TimeoutError:
            if os.getppid() != client:  # the session ended without stopping it (killed)
                sys.exit(0)
            continue
        connection.settimeout(None)
        message, fds, _flags, _address = socket.recv_fds(connection, 1 << 20, 2)
        if os.fork() != 0:  # the server: on to the next command
            connection.close()
            for fd in fds:
                os.close(fd)
            continue
        server.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        command = os.fork()
        if command == 0:
            connection.close()
            return json.loads(message), fds
        for fd in fds:
            os.close(fd)
        connection.sendall(json.dumps({"pid": command}).encode() + b"\n")
        _, status = os.waitpid(command, 0)
        connection.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        os._exit(0)


def _run(request: dict, fds: list[int]) -> None:
    """Become `python -m blip_recipes.cli ARGS` in the request's directory and environment; exit as it would."""
    import runpy

    if request["session"]:
        os.setsid()
    if request["default_signal"] is not None:  # as signal_at's preexec_fn, then Python's start, leave it
        sig = request["default_signal"]
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null, 0), (fds[0], 1), (fds[1], 2)):
        os.dup2(fd, target)
    for fd in {null, *fds}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = os.getcwd()  # as `python -m` puts it
    sys.argv = ["-m", *request["args"]]
    runpy.run_module("blip_recipes.cli", run_name="__main__", alter_sys=True)


PRELOADED = Preloaded()  # one per test session, whichever module imports it

if __name__ == "__main__":
    request, fds = _serve(sys.argv[1], int(sys.argv[2]))
    _run(request, fds)  # its SystemExit, or an exception's traceback and exit code 1, as a new interpreter ends
