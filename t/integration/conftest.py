"""Fixtures for the integration tests: real processes on loopback.

    engine          a running llm-engine (the default SmolLM2 model) on a
                    unix socket in a temp dir, plus a TCP port; shared by
                    the tests of a module
    start_engine    a factory for tests that need their own engine (drain,
                    shutdown): start_engine(extra_args=[...]) -> Engine
    redis_server    a real redis-server on a free loopback port
    model_path      the default model (tools/default-model.sh), or skip
    llm_build       the build folder: env LLM_BUILD, default "build"

Processes are stopped by pid (SIGTERM, then SIGKILL after a grace
period), never by name.  Other fixture files (the nginx one) import the
helpers below: Engine, Redis, free_port, wait_until, REPO.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))

import llm_proto  # noqa: E402


def build_dir():
    b = os.environ.get("LLM_BUILD", "build")
    return b if os.path.isabs(b) else os.path.join(REPO, b)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, what, proc=None, log=None, step=0.02):
    """Polls pred() until true; fails with the process log if the process
    died or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s: process exited with %s\n%s"
                               % (what, proc.returncode, _tail(log)))
        time.sleep(step)
    raise TimeoutError("%s: timed out after %.0f s\n%s"
                       % (what, timeout, _tail(log)))


def _tail(path, n=40):
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def stop_pid(proc, timeout=10.0):
    """SIGTERM, wait, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def default_model():
    env = os.environ.get("LLM_MODEL")
    if env:
        return env if os.path.exists(env) else None
    try:
        out = subprocess.run([os.path.join(REPO, "tools", "default-model.sh")],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.exists(path) else None


class Engine:
    """One llm-engine process."""

    def __init__(self, binary, model, workdir, extra_args=(), tcp=True,
                 threads=None):
        self.sock_path = os.path.join(workdir, "engine.sock")
        self.addr = "unix:" + self.sock_path
        self.port = free_port() if tcp else None
        self.tcp_addr = "127.0.0.1:%d" % self.port if tcp else None
        self.log = os.path.join(workdir, "engine.log")
        args = [binary, "--model", model, "--listen", self.addr,
                "--threads", str(threads or os.environ.get(
                    "LLM_TEST_THREADS", min(os.cpu_count() or 1, 4))),
                "--log-level", os.environ.get("LLM_ENGINE_LOG", "info")]
        if tcp:
            args += ["--listen", self.tcp_addr]
        args += list(extra_args)
        self.args = args
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(args, stdout=self._logf,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def wait_ready(self, timeout=120.0):
        def ready():
            if not os.path.exists(self.sock_path):
                return False
            try:
                with llm_proto.Client(self.addr, timeout=5) as c:
                    c.hello("pytest-ready")
                return True
            except (OSError, llm_proto.ProtocolError):
                return False
        wait_until(ready, timeout, "llm-engine start", self.proc, self.log,
                   step=0.05)
        return self

    def client(self, hello=True, tcp=False, timeout=60.0):
        return llm_proto.Client(self.tcp_addr if tcp else self.addr,
                                timeout=timeout, hello=hello)

    def log_text(self):
        self._logf.flush()
        with open(self.log, errors="replace") as f:
            return f.read()

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout=30.0):
        return self.proc.wait(timeout)

    def stop(self, timeout=30.0):
        rc = stop_pid(self.proc, timeout)
        self._logf.close()
        return rc


class Redis:
    """One redis-server on a free loopback port, no persistence."""

    def __init__(self, workdir, binary="redis-server"):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.addr = "%s:%d" % (self.host, self.port)
        self.url = "redis://%s/0" % self.addr
        self.log = os.path.join(workdir, "redis.log")
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", self.host,
             "--save", "", "--appendonly", "no", "--dir", workdir,
             "--daemonize", "no", "--protected-mode", "yes"],
            stdout=self._logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def command(self, *args):
        """Sends one command (RESP) and returns the raw reply bytes."""
        req = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            req += b"$%d\r\n%s\r\n" % (len(a), a)
        with socket.create_connection((self.host, self.port), 5) as s:
            s.sendall(req)
            return s.recv(65536)

    def wait_ready(self, timeout=20.0):
        def ready():
            try:
                return self.command("PING").startswith(b"+PONG")
            except OSError:
                return False
        wait_until(ready, timeout, "redis-server start", self.proc, self.log)
        return self

    def stop(self, timeout=10.0):
        rc = stop_pid(self.proc, timeout)
        self._logf.close()
        return rc


@pytest.fixture(scope="session")
def llm_build():
    return build_dir()


@pytest.fixture(scope="session")
def model_path():
    p = default_model()
    if p is None:
        pytest.skip("default model not installed (tools/default-model.sh)")
    return p


@pytest.fixture(scope="session")
def engine_bin(llm_build):
    b = os.path.join(llm_build, "llm-engine")
    if not os.access(b, os.X_OK):
        pytest.skip("%s not built" % b)
    return b


@pytest.fixture
def start_engine(engine_bin, model_path, tmp_path_factory):
    """Factory: start_engine(extra_args=(), ready=True) -> Engine; every
    engine it started is stopped at the end of the test."""
    started = []

    def start(extra_args=(), ready=True, tcp=True):
        d = str(tmp_path_factory.mktemp("engine"))
        e = Engine(engine_bin, model_path, d, extra_args, tcp=tcp)
        started.append(e)
        if ready:
            e.wait_ready()
        return e

    yield start
    for e in started:
        e.stop()


@pytest.fixture(scope="module")
def engine(engine_bin, model_path, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("engine"))
    e = Engine(engine_bin, model_path, d)
    try:
        e.wait_ready()
        yield e
    finally:
        rc = e.stop()
        if rc != 0:
            sys.stderr.write("llm-engine exited %s\n%s" % (rc, _tail(e.log)))


@pytest.fixture(scope="session")
def redis_bin():
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin",
                                                            "/usr/sbin"]:
        p = os.path.join(d, "redis-server")
        if os.access(p, os.X_OK):
            return p
    pytest.skip("redis-server not installed")


@pytest.fixture(scope="module")
def redis_server(redis_bin, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("redis"))
    r = Redis(d, redis_bin)
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()
