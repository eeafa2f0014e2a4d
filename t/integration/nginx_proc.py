"""The distro's nginx (/usr/sbin/nginx) loading the built module, for the
integration tests.

    from nginx_proc import Nginx, nginx          # the fixture too

    nginx           a module-scoped fixture: 2 workers in front of the
                    conftest `engine`, OpenAI API under /v1/; the test
                    fails if error.log shows a crashed worker, an [alert]
                    or an [emerg]
    Nginx(...)      one instance with its own prefix, config, pid file,
                    error log and temp paths (nginx -p DIR -c CONF); the
                    master runs in the foreground ("daemon off") so that
                    it is stopped and signalled by its pid

The module comes from $LLM_BUILD/ngx_http_llm_module.so (make module).
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import _tail, build_dir, free_port, stop_pid, wait_until

# the nginx binary; not $NGINX, which nginx itself reads (inherited
# listening sockets of a binary upgrade)
NGINX = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")

LOG_FORMAT = ('$request_uri $status model=$llm_model '
              'prompt=$llm_prompt_tokens completion=$llm_completion_tokens '
              'cached=$llm_cached_tokens ttft=$llm_ttft '
              'finish=$llm_finish_reason')

# What error.log must never show (NGINX's own wording).
BAD_LOG = re.compile(r"exited on signal|\[alert\]|\[emerg\]|"
                     r"open socket #\d+ left")

CONF = """
load_module {module};
{user}
worker_processes {workers};
error_log {prefix}/error.log info;
pid {prefix}/nginx.pid;

events {{
    worker_connections 1024;
}}

http {{
    log_format llm '{log_format}';
    access_log {prefix}/access.log llm;

    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    {engines}
    llm_model {model_name} {model};
    {http_extra}

    server {{
        listen 127.0.0.1:{port};

        location /v1/ {{
            llm_api openai;
            {location_extra}
        }}
    }}
}}
"""


def module_path():
    return os.path.join(build_dir(), "ngx_http_llm_module.so")


class Nginx:
    """One nginx master with its workers."""

    def __init__(self, prefix, engines, model, model_name="smollm2",
                 workers=2, http_extra="", location_extra=""):
        self.prefix = str(prefix)
        self.port = free_port()
        self.conf = os.path.join(self.prefix, "nginx.conf")
        self.error_log = os.path.join(self.prefix, "error.log")
        self.access_log = os.path.join(self.prefix, "access.log")
        self.pid_file = os.path.join(self.prefix, "nginx.pid")
        self.model_name = model_name
        self.proc = None
        os.makedirs(os.path.join(self.prefix, "tmp"), exist_ok=True)
        if isinstance(engines, str):
            engines = [engines]
        with open(self.conf, "w") as f:
            f.write(CONF.format(
                module=module_path(),
                # the engine's socket is 0660: workers must be allowed in
                user="user root;" if os.geteuid() == 0 else "",
                workers=workers, prefix=self.prefix,
                log_format=LOG_FORMAT,
                engines="\n    ".join("llm_engine %s;" % e for e in engines),
                model_name=model_name, model=model, port=self.port,
                http_extra=http_extra, location_extra=location_extra))

    # ---- processes ---------------------------------------------------

    def test_config(self):
        return subprocess.run([NGINX, "-p", self.prefix, "-c", self.conf,
                               "-t"], capture_output=True, text=True)

    def start(self, timeout=20.0):
        self._out = open(os.path.join(self.prefix, "stderr.log"), "ab")
        self.proc = subprocess.Popen(
            [NGINX, "-p", self.prefix, "-c", self.conf, "-g", "daemon off;"],
            stdout=self._out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        wait_until(self._listening, timeout, "nginx start", self.proc,
                   self.error_log)
        return self

    def _listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
            return True
        except OSError:
            return False

    def worker_pids(self):
        """The master's worker processes (from /proc)."""
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % d) as f:
                    st = f.read()
                with open("/proc/%s/cmdline" % d, "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            ppid = int(st.rsplit(")", 1)[1].split()[1])
            if ppid == self.pid and b"worker process" in cmd:
                pids.append(int(d))
        return pids

    def reload(self):
        """SIGHUP: new workers with a re-read config; the old ones finish
        their requests and exit."""
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout=30.0):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)      # graceful
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        rc = stop_pid(self.proc, 10)
        self._out.close()
        return rc

    # ---- logs --------------------------------------------------------

    def error_log_text(self):
        if not os.path.exists(self.error_log):
            return ""
        with open(self.error_log, errors="replace") as f:
            return f.read()

    def check_log(self):
        """Fails on a crashed worker, an [alert] or an [emerg]."""
        bad = [l for l in self.error_log_text().splitlines()
               if BAD_LOG.search(l)]
        assert not bad, "nginx error.log:\n" + "\n".join(bad[:20])

    def access_log_lines(self):
        if not os.path.exists(self.access_log):
            return []
        with open(self.access_log, errors="replace") as f:
            return f.read().splitlines()

    # ---- clients -----------------------------------------------------

    @property
    def base_url(self):
        return "http://127.0.0.1:%d/v1" % self.port

    def openai(self, **kw):
        import openai
        kw.setdefault("timeout", 120.0)
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key="none", **kw)

    def http(self, timeout=120.0):
        return http.client.HTTPConnection("127.0.0.1", self.port,
                                          timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=120.0):
        """One raw request: (status, headers dict, body bytes)."""
        c = self.http(timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            h = {"Content-Type": "application/json"}
            h.update(headers or {})
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            c.close()

    def post(self, path, body, **kw):
        return self.request("POST", "/v1" + path, body, **kw)


def start_nginx(prefix, engines, model, **kw):
    n = Nginx(prefix, engines, model, **kw)
    t = n.test_config()
    if t.returncode != 0:
        raise RuntimeError("nginx -t failed:\n" + t.stderr)
    return n.start()


@pytest.fixture(scope="session")
def nginx_module():
    if not os.access(NGINX, os.X_OK):
        pytest.skip("%s not installed" % NGINX)
    if not os.path.exists(module_path()):
        pytest.skip("%s not built (make module)" % module_path())
    return module_path()


@pytest.fixture(scope="module")
def nginx(nginx_module, engine, model_path, tmp_path_factory):
    n = start_nginx(tmp_path_factory.mktemp("nginx"), engine.addr,
                    model_path)
    try:
        yield n
    finally:
        n.stop()
        sys_log = _tail(n.error_log, 60)
        bad = [l for l in n.error_log_text().splitlines()
               if BAD_LOG.search(l)]
        assert not bad, "nginx error.log:\n%s\n...\n%s" % (
            "\n".join(bad[:20]), sys_log)


@pytest.fixture
def nginx_factory(nginx_module, model_path, tmp_path_factory):
    """Factory for tests that need their own nginx: nginx_factory(engines,
    **Nginx kwargs); each is stopped and its log checked at the end."""
    started = []

    def start(engines, **kw):
        n = start_nginx(tmp_path_factory.mktemp("nginx"), engines,
                        model_path, **kw)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()
    for n in started:
        n.check_log()
