"""Tenants: API keys (plain and sha256), 401/403 bodies and headers, the
tenant variable of gateways, adapter allow-lists (404 model_not_found for
what a tenant may not use), the max_tokens ceiling, tenants added to Redis
at run time, reload re-reading the file, and nginx -t on bad files.
Real nginx (4 workers), real llm-engine, real redis-server.
"""

import json
import os
import signal
import time

import pytest

from conftest import _tail
from nginx_proc import BAD_LOG, Nginx, nginx_module, start_nginx  # noqa: F401
from tenants_util import (chat, key_digest, nginx_with, redis_set, tenant,
                          tenants_log, wait_for, wait_new_workers,
                          write_tenants)

ACME = "sk-acme-test-0123456789abcdefXY"
GLOBEX = "sk-globex-test-9876543210zz"
OFF = "sk-off-test-5555555555555555"
SMALL = "sk-small-test-6666666666666666"
ADAPTED = "sk-adapted-test-7777777777777"
ANY = "sk-any-test-8888888888888888"

TENANTS = [
    tenant("acme", key=ACME, priority="interactive", weight=3),
    # stored as its SHA-256 only
    tenant("globex", keys=["sha256:" + key_digest(GLOBEX)],
           adapters=["globex-support", "globex-legal"]),
    tenant("adapted", key=ADAPTED, adapters=["ad-one"],
           default_adapter="ad-one"),
    tenant("dormant", key=OFF, disabled=True),
    tenant("small", key=SMALL, max_tokens=4, priority="batch"),
    tenant("anyone", key=ANY, adapters=["*"]),
]


@pytest.fixture(scope="module")
def redis(redis_server):
    return redis_server


@pytest.fixture(scope="module")
def ng(nginx_module, engine, redis, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    f = write_tenants(str(d / "tenants.json"), TENANTS)

    def factory(engines, **kw):
        return start_nginx(str(d / "nginx"), engines, model_path, **kw)

    n = nginx_with(factory, engine.addr, f, redis=redis,
                   http="llm_tenants_redis on; llm_tenants_cache_time 1s;",
                   location="llm_tenant_variable $http_x_tenant;")
    try:
        yield n
    finally:
        n.stop()
        bad = [l for l in n.error_log_text().splitlines()
               if BAD_LOG.search(l)]
        assert not bad, "\n".join(bad[:20]) + _tail(n.error_log)


def error_of(status, headers, doc, want, code=None, type_=None):
    assert status == want, doc
    assert headers["content-type"] == "application/json"
    assert set(doc) == {"error"}
    e = doc["error"]
    assert set(e) == {"message", "type", "param", "code"}
    if code:
        assert e["code"] == code, e
    if type_:
        assert e["type"] == type_, e
    return e


# ---- keys ---------------------------------------------------------------

def test_no_key_is_401(ng):
    st, h, doc = chat(ng)
    e = error_of(st, h, doc, 401, "invalid_api_key", "invalid_request_error")
    assert "Authorization: Bearer" in e["message"]
    assert h["www-authenticate"].startswith("Bearer")
    assert not any(k.startswith("x-ratelimit") for k in h)


@pytest.mark.parametrize("auth", ["Basic abc", "Bearer", "Bearer    ",
                                  "Token " + ACME])
def test_malformed_authorization_is_401(ng, auth):
    st, h, doc = chat(ng, headers={"Authorization": auth})
    error_of(st, h, doc, 401, "invalid_api_key")


def test_unknown_key_is_401_and_masked(ng):
    bad = "sk-wrong-key-abcdefghijklmnopqrstuvwxyz"
    st, h, doc = chat(ng, key=bad)
    e = error_of(st, h, doc, 401, "invalid_api_key", "invalid_request_error")
    assert e["message"] == "Incorrect API key provided: sk-wr***yz"
    # the key never appears in full, in the answer or the logs
    time.sleep(0.2)
    assert bad not in json.dumps(doc)
    assert bad not in ng.error_log_text()
    assert all(bad not in l for l in tenants_log(ng))


def test_short_unknown_key_is_fully_masked(ng):
    st, h, doc = chat(ng, key="short")
    e = error_of(st, h, doc, 401, "invalid_api_key")
    assert e["message"] == "Incorrect API key provided: ***"


def test_plain_key(ng):
    st, h, doc = chat(ng, key=ACME)
    assert st == 200, doc
    assert doc["usage"]["completion_tokens"] >= 1


def test_sha256_key_and_scheme_case(ng):
    st, h, doc = chat(ng, headers={"Authorization": "bearer " + GLOBEX})
    assert st == 200, doc


def test_key_prefix_or_extension_is_refused(ng):
    for k in (ACME[:-1], ACME + "0", ACME.upper()):
        st, h, doc = chat(ng, key=k)
        assert st == 401, k


def test_tenant_in_access_log(ng):
    st, _, doc = chat(ng, key=ACME)
    assert st == 200
    wait_for(lambda: any(l == "200 acme - -" for l in tenants_log(ng)), 5,
             "access log line")
    # the default adapter of a tenant that asks for the base model goes
    # to the engine (which has no adapters here: 404 from it)
    chat(ng, key=ADAPTED)
    wait_for(lambda: any(l.split()[1] == "adapted" and l.endswith(" ad-one")
                         for l in tenants_log(ng)), 5, "access log line")


def test_disabled_tenant_is_403(ng):
    st, h, doc = chat(ng, key=OFF)
    error_of(st, h, doc, 403, "tenant_disabled", "invalid_request_error")


def test_models_need_a_key(ng):
    st, h, data = ng.request("GET", "/v1/models")
    assert st == 401
    assert json.loads(data)["error"]["code"] == "invalid_api_key"
    st, h, data = ng.request("GET", "/v1/models",
                             headers={"Authorization": "Bearer " + ACME})
    assert st == 200
    assert json.loads(data)["data"][0]["id"] == "smollm2"


# ---- the gateway's own authentication ------------------------------------

def test_tenant_variable(ng):
    st, h, doc = chat(ng, headers={"X-Tenant": "acme"})
    assert st == 200, doc
    st, h, doc = chat(ng, headers={"X-Tenant": "nobody"})
    error_of(st, h, doc, 403, "unknown_tenant")
    st, h, doc = chat(ng, headers={"X-Tenant": "dormant"})
    error_of(st, h, doc, 403, "tenant_disabled")
    # an empty value falls back to the key
    st, h, doc = chat(ng, headers={"X-Tenant": ""})
    error_of(st, h, doc, 401, "invalid_api_key")


# ---- adapters -------------------------------------------------------------

def test_adapter_allow_list(ng):
    # acme may use no adapter: another tenant's adapter looks exactly like
    # a model that does not exist
    for model in ("globex-support", "smollm2:globex-support",
                  "no-such-model"):
        st, h, doc = chat(ng, key=ACME, model=model)
        e = error_of(st, h, doc, 404, "model_not_found")
        assert e["param"] == "model"
        assert e["message"] == ("The model `%s` does not exist or you do "
                                "not have access to it." % model)
    wait_for(lambda: sum(l == "404 acme model_not_found -"
                         for l in tenants_log(ng)) == 3, 5, "log lines")
    # globex may: the module passes the adapter to the engine ($llm_adapter
    # is set; this engine has no adapters and answers 404 itself)
    for model in ("globex-legal", "smollm2:globex-legal"):
        chat(ng, key=GLOBEX, model=model)
    wait_for(lambda: sum(l.split()[1] == "globex"
                         and l.endswith(" globex-legal")
                         for l in tenants_log(ng)) == 2, 5, "log lines")
    st, h, doc = chat(ng, key=GLOBEX, model="globex-other")
    e = error_of(st, h, doc, 404, "model_not_found")
    assert "or you do not have access to it" in e["message"]


def test_adapter_wildcard(ng, redis):
    # "adapters": ["*"]: any well-formed name goes to the engine (this one
    # has no adapters and answers 404 itself, with the adapter logged);
    # the base model stays the base, and acme is still refused
    st, h, doc = chat(ng, key=ANY, model="globex-support")
    error_of(st, h, doc, 404, "model_not_found")
    wait_for(lambda: any(l.split()[1] == "anyone"
                         and l.endswith(" globex-support")
                         for l in tenants_log(ng)), 5, "log line")
    st, h, doc = chat(ng, key=ANY, model="bad name!")
    error_of(st, h, doc, 404, "model_not_found")
    st, h, doc = chat(ng, key=ANY)
    assert st == 200, doc
    st, h, doc = chat(ng, key=ACME, model="globex-support")
    error_of(st, h, doc, 404, "model_not_found")

    # from Redis, with a default adapter outside any list
    key = "sk-wild-%d-abcdefghijklmn" % os.getpid()
    redis_set(redis, "llm:key:" + key_digest(key), json.dumps(
        {"name": "wild", "adapters": ["*"], "default_adapter": "zz-one"}))
    wait_for(lambda: chat(ng, key=key)[0] == 404, 10,
             "the Redis tenant's default adapter to reach the engine",
             step=0.2)
    wait_for(lambda: any(l.split()[1] == "wild" and l.endswith(" zz-one")
                         for l in tenants_log(ng)), 5, "log line")


# ---- max_tokens ceiling ---------------------------------------------------

def test_max_tokens_ceiling(ng):
    st, h, doc = chat(ng, key=SMALL, max_tokens=5)
    e = error_of(st, h, doc, 400, "invalid_value")
    assert e["param"] == "max_tokens"
    st, h, doc = chat(ng, key=SMALL, max_tokens=None)
    assert st == 200, doc
    assert doc["usage"]["completion_tokens"] <= 4
    st, h, doc = chat(ng, key=SMALL, max_tokens=4)
    assert st == 200, doc


# ---- Redis: tenants at run time -------------------------------------------

def test_redis_tenant_at_run_time(ng, redis):
    key = "sk-runtime-%d-abcdefghijkl" % os.getpid()
    st, h, doc = chat(ng, key=key)
    assert st == 401        # unknown, and remembered for 1 s
    redis_set(redis, "llm:key:" + key_digest(key), json.dumps(
        {"name": "newco", "priority": "standard",
         "limits": {"requests_per_minute": 100}}))

    def ok():
        st, h, doc = chat(ng, key=key)
        return st == 200 and h
    h = wait_for(ok, 10, "the Redis tenant to be seen", step=0.2)
    assert h["x-ratelimit-limit-requests"] == "100"
    wait_for(lambda: any(l == "200 newco - -" for l in tenants_log(ng)), 5,
             "access log line")

    # by name, for llm_tenant_variable
    redis_set(redis, "llm:tenant:varco", json.dumps({"name": "varco"}))
    wait_for(lambda: chat(ng, headers={"X-Tenant": "varco"})[0] == 200, 10,
             "the Redis tenant by name", step=0.2)


def test_redis_bad_record_is_refused_and_logged(ng, redis):
    key = "sk-badrecord-%d-abcdefghijkl" % os.getpid()
    redis_set(redis, "llm:key:" + key_digest(key),
              json.dumps({"name": "bad", "weight": 0}))
    st, h, doc = chat(ng, key=key)
    error_of(st, h, doc, 401, "invalid_api_key")
    wait_for(lambda: "bad tenant record in Redis" in ng.error_log_text(), 5,
             "the error in error.log")
    assert key not in ng.error_log_text()


# ---- reload ---------------------------------------------------------------

def test_reload_rereads_the_file(nginx_module, engine, model_path,
                                 tmp_path):
    a, b = "sk-reload-a-111111111111", "sk-reload-b-222222222222"
    f = write_tenants(str(tmp_path / "t.json"), [tenant("one", key=a)])

    def factory(engines, **kw):
        return start_nginx(str(tmp_path / "nginx"), engines, model_path,
                           **kw)

    n = nginx_with(factory, engine.addr, f, workers=2)
    try:
        assert chat(n, key=a)[0] == 200
        assert chat(n, key=b)[0] == 401
        write_tenants(f, [tenant("two", key=b)])
        old = n.worker_pids()
        n.reload()
        wait_new_workers(n, old)
        assert chat(n, key=b)[0] == 200
        assert chat(n, key=a)[0] == 401
        # a broken file: the reload is refused, the old workers stay
        with open(f, "w") as fh:
            fh.write("{ not json")
        old = n.worker_pids()
        n.reload()
        wait_for(lambda: "llm_tenants" in n.error_log_text()
                 and "emerg" in n.error_log_text(), 10, "reload refused")
        assert set(n.worker_pids()) == set(old)
        assert chat(n, key=b)[0] == 200
    finally:
        n.stop()


# ---- nginx -t -------------------------------------------------------------

BAD_FILES = [
    ("{", "line"),
    ('{"tenants": {}}', "\"tenants\" must be an array"),
    ('{"tenants": [], "extra": 1}', "unknown field \"extra\""),
    ('{"tenants": [{"name": "a", "keyz": []}]}', "unknown field \"keyz\""),
    ('{"tenants": [{"name": "a b"}]}', "\"name\""),
    ('{"tenants": [{"name": "a", "priority": "urgent"}]}', "priority"),
    ('{"tenants": [{"name": "a", "weight": 0}]}', "weight"),
    ('{"tenants": [{"name": "a", "limits": {"rpm": 1}}]}', "limits.rpm"),
    ('{"tenants": [{"name": "a", "limits": {"max_concurrent": -1}}]}',
     "max_concurrent"),
    ('{"tenants": [{"name": "a", "adapters": ["x"], '
     '"default_adapter": "y"}]}', "default_adapter"),
    ('{"tenants": [{"name": "a", "keys": ["sha256:abc"]}]}', "64 hex"),
    ('{"tenants": [{"name": "a", "keys": ["short"]}]}', "8 to"),
    ('{"tenants": [{"name": "a", "keys": ["sk-aaaaaaaaaaaa"]}, '
     '{"name": "b", "keys": ["sk-aaaaaaaaaaaa"]}]}', "same key"),
    ('{"tenants": [{"name": "a"}, {"name": "a"}]}', "duplicate tenant"),
]


@pytest.mark.parametrize("text,why", BAD_FILES)
def test_bad_tenants_file_fails_nginx_t(nginx_module, model_path, tmp_path,
                                        text, why):
    f = tmp_path / "bad.json"
    f.write_text(text)
    n = Nginx(str(tmp_path), "unix:/nonexistent.sock", model_path,
              http_extra="llm_tenants %s;" % f)
    t = n.test_config()
    assert t.returncode != 0
    assert "llm_tenants" in t.stderr and str(f) in t.stderr, t.stderr
    assert why in t.stderr, t.stderr


def test_tenants_redis_needs_llm_redis(nginx_module, model_path, tmp_path):
    n = Nginx(str(tmp_path), "unix:/nonexistent.sock", model_path,
              http_extra="llm_tenants_redis on;")
    t = n.test_config()
    assert t.returncode != 0 and "llm_redis" in t.stderr


def test_example_tenants_file_is_valid(nginx_module, model_path, tmp_path):
    f = os.path.join(os.path.dirname(__file__), "..", "..", "conf",
                     "tenants.json")
    n = Nginx(str(tmp_path), "unix:/nonexistent.sock", model_path,
              http_extra="llm_tenants %s;" % os.path.abspath(f))
    t = n.test_config()
    assert t.returncode == 0, t.stderr


# ---- Redis away during a lookup -------------------------------------------

def test_lookup_with_redis_away_is_503(nginx_module, engine, model_path,
                                       tmp_path, redis_bin):
    from tenants_util import FixedRedis
    r = FixedRedis(str(tmp_path)).wait_ready()
    f = write_tenants(str(tmp_path / "t.json"), [tenant("one", key=ACME)])

    def factory(engines, **kw):
        return start_nginx(str(tmp_path / "nginx"), engines, model_path,
                           **kw)

    n = nginx_with(factory, engine.addr, f, redis=r, workers=2,
                   http="llm_tenants_redis on;")
    try:
        r.stop()
        key = "sk-unknown-while-down-123456"
        st, h, doc = chat(n, key=key)
        error_of(st, h, doc, 503, "tenant_directory_unavailable",
                 "server_error")
        assert h["retry-after"] == "1"
        # file tenants do not need Redis
        assert chat(n, key=ACME)[0] == 200
        pids = n.worker_pids()
        assert len(pids) == 2
    finally:
        n.stop()
    n.check_log()


# ---- what the engine is told ---------------------------------------------

class SubmitRecorder:
    """A unix-socket proxy in front of the engine that records the
    SUBMIT frames going through it."""

    def __init__(self, engine_sock, path):
        import socket
        import threading
        self.engine_sock, self.path = engine_sock, path
        self.submits = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(16)
        self.threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self):
        import socket
        import threading
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            e = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            e.connect(self.engine_sock)
            threading.Thread(target=self._pipe, args=(c, e, True),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(e, c, False),
                             daemon=True).start()

    def _pipe(self, src, dst, parse):
        buf = b""
        while True:
            try:
                d = src.recv(65536)
            except OSError:
                d = b""
            if not d:
                for s in (src, dst):
                    try:
                        s.shutdown(2)
                    except OSError:
                        pass
                return
            if parse:
                buf += d
                buf = self._frames(buf)
            try:
                dst.sendall(d)
            except OSError:
                return

    def _frames(self, buf):
        import struct
        import llm_proto
        while len(buf) >= 16:
            _, _, ftype, length, _ = struct.unpack("<IHHII", buf[:16])
            if len(buf) < 16 + length:
                break
            if ftype == llm_proto.SUBMIT:
                self.submits.append(self._submit(buf[16:16 + length]))
            buf = buf[16 + length:]
        return buf

    @staticmethod
    def _submit(p):
        import struct
        f = struct.unpack_from("<IfifffffQHBBHHI", p)
        o = struct.calcsize("<IfifffffQHBBHHI")
        strs = []
        for _ in range(3):
            (n,) = struct.unpack_from("<H", p, o)
            strs.append(p[o + 2:o + 2 + n].decode())
            o += 2 + n
        return dict(max_tokens=f[0], priority=f[11], weight=f[12],
                    tenant=strs[0], adapter=strs[1], cache_namespace=strs[2])

    def close(self):
        self.srv.close()


def test_submit_carries_the_tenant(nginx_module, engine, model_path,
                                   tmp_path):
    rec = SubmitRecorder(engine.sock_path, str(tmp_path / "proxy.sock"))
    f = write_tenants(str(tmp_path / "t.json"), [
        tenant("acme", key=ACME, priority="interactive", weight=3),
        tenant("globex", key=GLOBEX, adapters=["globex-legal"],
               cache_namespace="shared", max_tokens=7),
        tenant("plain", key=SMALL)])

    def factory(engines, **kw):
        return start_nginx(str(tmp_path / "nginx"), engines, model_path,
                           **kw)

    n = nginx_with(factory, "unix:" + rec.path, f, workers=1)
    try:
        assert chat(n, key=ACME, max_tokens=2)[0] == 200
        chat(n, key=GLOBEX, max_tokens=None, model="smollm2:globex-legal")
        assert chat(n, key=SMALL, max_tokens=2)[0] == 200
        wait_for(lambda: len(rec.submits) == 3, 5, "3 SUBMITs")
    finally:
        n.stop()
        rec.close()
    a, g, p = rec.submits
    assert a == dict(max_tokens=2, priority=1, weight=3, tenant="acme",
                     adapter="", cache_namespace="acme")
    # the ceiling is the default max_tokens
    assert g == dict(max_tokens=7, priority=2, weight=1, tenant="globex",
                     adapter="globex-legal", cache_namespace="shared")
    assert p == dict(max_tokens=2, priority=2, weight=1, tenant="plain",
                     adapter="", cache_namespace="plain")
