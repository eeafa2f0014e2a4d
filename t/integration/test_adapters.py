"""LoRA adapters through NGINX: the official openai client against the
real module, llm-engine and adapters written by tools/make_lora.py.

- /v1/models lists the base and the adapters; unknown adapters get 404
  model_not_found, OpenAI-shaped;
- two adapters and the base in concurrent streams give the same text as
  each alone (and adapters do change the text);
- the admin location loads, reloads and unloads adapters while other
  streams run, refuses corrupted files with a message naming the file,
  and asks for its key;
- a small device (and host) budget evicts adapters and loads them again
  with the same outputs; a sequence whose adapter cannot be resident yet
  waits while the rest of the batch runs;
- $llm_adapter in the access log.
"""

import concurrent.futures as futures
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, Engine, free_port, wait_until
from nginx_proc import nginx_module  # noqa: F401  (fixture)
from nginx_proc import start_nginx

ADMIN_KEY = "test-admin-key"
PROMPT = "Write one sentence about the sea."
COUNTING = "1, 2, 3, 4, 5,"
MAX_TOKENS = 20

# name -> make_lora.py arguments (ranks and target sets differ)
ADAPTERS = {
    "a8": ["--rank", "8", "--targets", "q,k,v,o", "--seed", "11"],
    "b16": ["--rank", "16", "--targets", "gate,up,down", "--rslora",
            "--seed", "12"],
    "c4": ["--rank", "4", "--targets", "q,v,down", "--seed", "13"],
}
DYNAMIC = ["--rank", "8", "--targets", "q,v,up", "--seed", "14"]
DYNAMIC2 = ["--rank", "12", "--targets", "k,o,gate", "--seed", "15"]


def make_adapter(model, out, args):
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_lora.py"),
                    "--base", model, "--out", out] + list(args),
                   check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def lora_dirs(model_path, tmp_path_factory):
    """{"root": folder of the registered adapters, "dyn": .., "dyn2": ..,
    "bad": corrupted copies}"""
    d = tmp_path_factory.mktemp("adapters")
    root = os.path.join(str(d), "registered")
    os.makedirs(root)
    for name, args in ADAPTERS.items():
        make_adapter(model_path, os.path.join(root, name), args)
    extra = os.path.join(str(d), "extra")
    os.makedirs(extra)
    dyn = make_adapter(model_path, os.path.join(extra, "dyn"), DYNAMIC)
    dyn2 = make_adapter(model_path, os.path.join(extra, "dyn2"), DYNAMIC2)

    # corrupted copies of a8: weights cut in half; a garbage header length
    cut = os.path.join(extra, "cut")
    shutil.copytree(os.path.join(root, "a8"), cut)
    st = os.path.join(cut, "adapter_model.safetensors")
    with open(st, "rb") as f:
        data = f.read()
    with open(st, "wb") as f:
        f.write(data[:len(data) // 2])
    garbage = os.path.join(extra, "garbage")
    shutil.copytree(os.path.join(root, "a8"), garbage)
    with open(os.path.join(garbage, "adapter_model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 8 + b"{not json")
    return {"root": root, "dyn": dyn, "dyn2": dyn2, "cut": cut,
            "garbage": garbage}


def admin_extra(admin_port):
    """A second server (loopback, key) with the admin location, and an
    access log with $llm_adapter (relative to the nginx prefix)."""
    return """
    log_format adapters '$request_uri $status adapter=$llm_adapter';
    access_log adapters.log adapters;
    llm_adapters_cache_time 500ms;

    server {
        listen 127.0.0.1:%d;
        location /admin/ {
            llm_admin;
            llm_admin_key %s;
            allow 127.0.0.1;
            deny all;
        }
    }
""" % (admin_port, ADMIN_KEY)


class Stack:
    def __init__(self, engine, nginx, admin_port):
        self.engine = engine
        self.nginx = nginx
        self.admin_port = admin_port

    def admin(self, method, path, body=None, key=ADMIN_KEY):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port,
                                       timeout=120)
        try:
            h = {"Content-Type": "application/json"}
            if key is not None:
                h["Authorization"] = "Bearer " + key
            c.request(method, "/admin" + path,
                      body=json.dumps(body) if body is not None else None,
                      headers=h)
            r = c.getresponse()
            data = r.read()
            try:
                doc = json.loads(data)
            except ValueError:
                doc = data
            return r.status, doc
        finally:
            c.close()

    def stats(self):
        with self.engine.client() as c:
            return c.stats()


def start_stack(engine_bin, model_path, tmp_path_factory, extra_args):
    d = str(tmp_path_factory.mktemp("lora-engine"))
    e = Engine(engine_bin, model_path, d, extra_args, tcp=False)
    e.wait_ready()
    admin_port = free_port()
    try:
        n = start_nginx(tmp_path_factory.mktemp("lora-nginx"), e.addr,
                        model_path, http_extra=admin_extra(admin_port))
    except Exception:
        e.stop()
        raise
    return Stack(e, n, admin_port)


def stop_stack(st):
    try:
        st.nginx.stop()
        st.nginx.check_log()
    finally:
        assert st.engine.stop() == 0


@pytest.fixture(scope="module")
def stack(nginx_module, engine_bin, model_path, lora_dirs,  # noqa: F811
          tmp_path_factory):
    st = start_stack(engine_bin, model_path, tmp_path_factory,
                     ["--adapters", lora_dirs["root"]])
    try:
        yield st
    finally:
        stop_stack(st)


def model_ids(client):
    return [m.id for m in client.models.list()]


def complete(client, model, prompt=PROMPT, max_tokens=MAX_TOKENS,
             stream=True):
    """Greedy text of one chat completion."""
    msgs = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=msgs,
                                           max_tokens=max_tokens,
                                           temperature=0)
        return r.choices[0].message.content
    out = []
    for ch in client.chat.completions.create(model=model, messages=msgs,
                                             max_tokens=max_tokens,
                                             temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            out.append(ch.choices[0].delta.content)
    return "".join(out)


@pytest.fixture(scope="module")
def alone(stack):
    """The text of each model, one request at a time."""
    c = stack.nginx.openai()
    return {m: complete(c, m) for m in ("smollm2", "a8", "b16", "c4")}


# ---- names and listing ---------------------------------------------------

def test_models_lists_base_and_adapters(stack):
    import openai
    c = stack.nginx.openai()
    ids = [m.id for m in c.models.list()]
    assert ids[0] == "smollm2"
    assert set(ids) == {"smollm2", "a8", "b16", "c4"}
    m = c.models.retrieve("a8")
    assert m.id == "a8" and m.model_extra.get("parent") == "smollm2"
    assert c.models.retrieve("smollm2:b16").id == "b16"
    with pytest.raises(openai.NotFoundError) as ei:
        c.models.retrieve("nope")
    assert ei.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("model", ["nope", "smollm2:nope", "bad name!",
                                   "smollm2:", ".hidden"])
def test_unknown_adapter_404(stack, model):
    import openai
    c = stack.nginx.openai()
    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model=model, max_tokens=4,
                                  messages=[{"role": "user",
                                             "content": "hi"}])
    err = ei.value.body
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"
    assert err["message"] == "The model `%s` does not exist" % model
    # the raw answer is OpenAI-shaped too
    status, _, body = stack.nginx.post("/completions", {
        "model": model, "prompt": "x", "max_tokens": 1})
    assert status == 404
    assert json.loads(body)["error"]["code"] == "model_not_found"


def test_both_name_forms(stack, alone):
    c = stack.nginx.openai()
    assert complete(c, "smollm2:a8") == alone["a8"]


def test_adapters_change_the_output(alone):
    texts = list(alone.values())
    assert all(texts), alone
    # random adapters of this scale change greedy text visibly
    assert len(set(texts)) == len(texts), alone


# ---- concurrency ---------------------------------------------------------

def test_concurrent_streams_same_as_alone(stack, alone):
    """Two adapters and the base, several streams of each at once."""
    c = stack.nginx.openai()
    models = ["smollm2", "a8", "b16"] * 3
    with futures.ThreadPoolExecutor(len(models)) as ex:
        got = list(ex.map(lambda m: complete(c, m), models))
    for m, text in zip(models, got):
        assert text == alone[m], m


def test_non_streaming_same_text(stack, alone):
    c = stack.nginx.openai()
    assert complete(c, "b16", stream=False) == alone["b16"]


def test_access_log_names_the_adapter(stack, alone):
    log = os.path.join(stack.nginx.prefix, "adapters.log")

    def logged():
        if not os.path.exists(log):
            return []
        with open(log) as f:
            return [l for l in f.read().splitlines()
                    if l.startswith("/v1/chat/completions 200")]
    before = len(logged())
    c = stack.nginx.openai()
    complete(c, "c4", max_tokens=2)
    complete(c, "smollm2:a8", max_tokens=2)
    complete(c, "smollm2", max_tokens=2)
    # a worker writes the line after the response has gone: wait for all
    # three (the last could trail the client, slower under sanitizers)
    wait_until(lambda: len(logged()) >= before + 3, 10, "access log")
    assert logged()[before:before + 3] == [
        "/v1/chat/completions 200 adapter=c4",
        "/v1/chat/completions 200 adapter=a8",
        "/v1/chat/completions 200 adapter=-"]


# ---- the admin location ----------------------------------------------------

def test_admin_needs_its_key(stack):
    assert stack.admin("GET", "/adapters", key=None)[0] == 401
    status, doc = stack.admin("GET", "/adapters", key="wrong")
    assert status == 401 and doc["error"]["code"] == "invalid_admin_key"
    status, doc = stack.admin("GET", "/adapters")
    assert status == 200
    names = [a["name"] for a in doc["data"]]
    assert names == sorted(ADAPTERS)
    a8 = [a for a in doc["data"] if a["name"] == "a8"][0]
    assert a8["max_rank"] == 8 and a8["bytes"] > 0 and a8["engines"] == 1


def test_admin_routes_and_methods(stack):
    assert stack.admin("GET", "/nothing")[0] == 404
    assert stack.admin("PUT", "/adapters")[0] == 405
    assert stack.admin("GET", "/adapters/nope")[0] == 404
    assert stack.admin("DELETE", "/adapters/nope")[0] == 404
    status, doc = stack.admin("POST", "/adapters", {"name": "bad name"})
    assert status == 400 and doc["error"]["code"] == "invalid_name"
    status, doc = stack.admin("POST", "/adapters", {"name": "x",
                                                    "path": 5})
    assert status == 400
    status, doc = stack.admin("POST", "/adapters", {"name": "never",
                                                    "path": "/nonexistent"})
    assert status == 400 and "/nonexistent" in doc["error"]["message"]


def test_admin_bad_bodies(stack):
    """Nothing an admin client sends crashes a worker."""
    import http.client
    for body in (b"", b"not json", b"[]", b'{"name": null}',
                 b'{"name": 5}', b'{"name": "a\\u0000b"}',
                 b'{"name": "x", "path": "/tmp/a\\u0000b"}',
                 b'{"name": "%s"}' % (b"n" * 300), b"{" * 5000,
                 b'{"name": "x", "path": "%s"}' % (b"p" * 2000)):
        c = http.client.HTTPConnection("127.0.0.1", stack.admin_port,
                                       timeout=60)
        c.request("POST", "/admin/adapters", body=body, headers={
            "Authorization": "Bearer " + ADMIN_KEY})
        r = c.getresponse()
        doc = json.loads(r.read())
        c.close()
        assert r.status in (400, 404, 413), (body[:40], r.status, doc)
        assert "error" in doc
    # the name from the URL must agree with the body's
    status, doc = stack.admin("POST", "/adapters/a8", {"name": "c4"})
    assert status == 400
    # a reload of a name never registered, without a folder: 404
    status, doc = stack.admin("POST", "/adapters", {"name": "never"})
    assert status == 404 and doc["error"]["code"] == "adapter_not_found"
    stack.nginx.check_log()


def test_dynamic_load_and_unload_while_streaming(stack, alone, lora_dirs):
    """Streams of the base and of a registered adapter run while another
    adapter is loaded, used, replaced and unloaded."""
    import openai
    c = stack.nginx.openai()

    def long_stream(model):
        # counting goes on without an end-of-text (a few seconds here)
        out = []
        for ch in c.completions.create(model=model, prompt=COUNTING,
                                       max_tokens=300, temperature=0,
                                       stream=True):
            if ch.choices and ch.choices[0].text:
                out.append(ch.choices[0].text)
        return "".join(out)

    with futures.ThreadPoolExecutor(4) as ex:
        runs = [ex.submit(long_stream, "smollm2"), ex.submit(long_stream,
                                                             "a8")]
        time.sleep(0.3)

        status, doc = stack.admin("POST", "/adapters", {
            "name": "dyn", "path": lora_dirs["dyn"]})
        assert status == 200, doc
        assert not runs[0].done() and not runs[1].done(), \
            "the long streams ended before the adapter was loaded"
        assert doc["name"] == "dyn" and len(doc["version"]) == 16
        v1 = doc["version"]
        assert doc["max_rank"] == 8

        dyn_text = complete(c, "dyn")
        assert dyn_text and dyn_text not in alone.values()
        wait_until(lambda: "dyn" in model_ids(c), 5, "dyn listed")

        # a new version under the same name: new requests use it
        status, doc = stack.admin("POST", "/adapters/dyn", {
            "path": lora_dirs["dyn2"]})
        assert status == 200 and doc["version"] != v1 and \
            doc["max_rank"] == 12
        dyn2_text = complete(c, "dyn")
        assert dyn2_text != dyn_text

        # reload from its folder: same files, same version and text
        status, doc = stack.admin("POST", "/adapters", {"name": "dyn"})
        assert status == 200
        assert complete(c, "dyn") == dyn2_text

        status, doc = stack.admin("DELETE", "/adapters/dyn")
        assert status == 200 and doc["name"] == "dyn"
        with pytest.raises(openai.NotFoundError):
            complete(c, "dyn")
        wait_until(lambda: "dyn" not in model_ids(c), 5, "dyn unlisted")

        base_long, a8_long = runs[0].result(), runs[1].result()

    # the streams were not disturbed: the same as each alone
    assert base_long == long_stream("smollm2")
    assert a8_long == long_stream("a8")
    assert base_long != a8_long


def test_corrupted_adapter_refused(stack, alone, lora_dirs):
    c = stack.nginx.openai()
    for bad in ("cut", "garbage"):
        status, doc = stack.admin("POST", "/adapters", {
            "name": "broken", "path": lora_dirs[bad]})
        assert status == 400, doc
        msg = doc["error"]["message"]
        assert doc["error"]["code"] == "adapter_refused"
        assert "adapter_model.safetensors" in msg, msg
        assert lora_dirs[bad] in msg, msg
    assert "broken" not in model_ids(c)

    # replacing a good adapter with bad files keeps the good version
    status, doc = stack.admin("GET", "/adapters/a8")
    version = doc["version"]
    status, doc = stack.admin("POST", "/adapters", {
        "name": "a8", "path": lora_dirs["cut"]})
    assert status == 400 and "current version stays" in \
        doc["error"]["message"]
    status, doc = stack.admin("GET", "/adapters/a8")
    assert status == 200 and doc["version"] == version
    assert complete(c, "a8") == alone["a8"]
    assert complete(c, "smollm2") == alone["smollm2"]
    log = stack.engine.log_text()
    assert "adapter load refused" in log and "truncated" in log


# ---- memory budgets ----------------------------------------------------------

# Sizes: host copies are f32 (a8 3.7 MB, c4 1.9 MB, b16 12.2 MB), device
# copies int8 (--adapter-dtype auto on the Q4_1 default model: a8 0.93 MB,
# c4 0.48 MB, b16 3.1 MB).
HOST_BUDGET = 4 << 20       # a8 or c4, not both; never b16
DEVICE_BUDGET = 1 << 20     # likewise


@pytest.fixture
def small_stack(nginx_module, engine_bin, model_path, lora_dirs,  # noqa
                tmp_path_factory):
    """An engine whose device pool and host cache each hold a8 or c4 but
    not both."""
    st = start_stack(engine_bin, model_path, tmp_path_factory,
                     ["--adapters", lora_dirs["root"],
                      "--adapter-host-memory", str(HOST_BUDGET),
                      "--adapter-device-memory", str(DEVICE_BUDGET)])
    try:
        yield st
    finally:
        stop_stack(st)


def test_eviction_and_reload_under_small_budgets(small_stack, alone):
    st = small_stack
    c = st.nginx.openai()
    s0 = st.stats()
    for m in ("a8", "c4", "a8", "c4"):
        assert complete(c, m) == alone[m], m
        s = st.stats()
        assert s["adapter_device_bytes"] <= DEVICE_BUDGET
        assert s["adapter_host_bytes"] <= HOST_BUDGET
        assert s["adapters_resident"] <= 1
    s = st.stats()
    assert s["adapter_uploads"] - s0["adapter_uploads"] == 4
    assert s["adapter_device_evictions"] >= 3
    assert s["adapter_loads"] - s0["adapter_loads"] == 4
    assert s["adapter_host_evictions"] >= 3
    # the admin list agrees: one adapter resident at most
    status, doc = st.admin("GET", "/adapters")
    assert status == 200
    assert sum(a["resident"] for a in doc["data"]) <= 1

    # b16 (12 MB) can never be resident here: refused, not queued forever
    import openai
    with pytest.raises(openai.APIStatusError) as ei:
        complete(c, "b16", max_tokens=2)
    assert ei.value.status_code == 500
    assert "more than the whole" in ei.value.body["message"]


@pytest.fixture
def device_stack(nginx_module, engine_bin, model_path, lora_dirs,  # noqa
                 tmp_path_factory):
    """Room on the device for one of a8 / c4 at a time; host plenty."""
    st = start_stack(engine_bin, model_path, tmp_path_factory,
                     ["--adapters", lora_dirs["root"],
                      "--adapter-device-memory", str(DEVICE_BUDGET)])
    try:
        yield st
    finally:
        stop_stack(st)


def test_sequence_waits_for_its_adapter(device_stack, alone):
    """a8 and c4 cannot be resident together: whichever comes second waits
    until the first finishes, while the base keeps running; every text is
    the one each gives alone."""
    st = device_stack
    c = st.nginx.openai()
    models = ["a8", "c4", "smollm2", "a8", "c4", "smollm2"]
    with futures.ThreadPoolExecutor(len(models)) as ex:
        got = list(ex.map(lambda m: complete(c, m), models))
    for m, text in zip(models, got):
        assert text == alone[m], m
    s = st.stats()
    assert s["adapter_device_evictions"] >= 1
    assert s["adapter_device_bytes"] <= DEVICE_BUDGET


# ---- the adapters' device dtype (--adapter-dtype) ------------------------

def test_default_engine_keeps_int8_copies(stack, alone):
    """--adapter-dtype auto on the Q4_1 default model: int8 device copies
    (a quarter of the f32 bytes: t/unit engine_lora_int8), said in the
    log at start."""
    assert complete(stack.nginx.openai(), "a8") == alone["a8"]
    assert "adapter weights on the device in int8 (--adapter-dtype auto)" \
        in stack.engine.log_text()


@pytest.fixture(scope="module")
def f16_stack(nginx_module, engine_bin, model_path, lora_dirs,  # noqa: F811
              tmp_path_factory):
    st = start_stack(engine_bin, model_path, tmp_path_factory,
                     ["--adapters", lora_dirs["root"],
                      "--adapter-dtype", "f16"])
    try:
        yield st
    finally:
        stop_stack(st)


def test_f16_adapters_serve_in_half_the_bytes(f16_stack, alone):
    """f16 copies (asked for): concurrent streams give each model's text
    alone on the f16 engine, the base's text is the default engine's, and
    the device holds half of the host (f32) bytes."""
    st = f16_stack
    c = st.nginx.openai()
    own = {m: complete(c, m) for m in ("smollm2", "a8", "b16", "c4")}
    assert own["smollm2"] == alone["smollm2"]
    for m in ("a8", "b16", "c4"):
        assert own[m] != own["smollm2"], m
    models = ["a8", "b16", "c4", "smollm2"] * 2
    with futures.ThreadPoolExecutor(len(models)) as ex:
        got = list(ex.map(lambda m: complete(c, m), models))
    for m, text in zip(models, got):
        assert text == own[m], m
    s = st.stats()
    assert s["adapters_resident"] == 3
    assert 0 < s["adapter_device_bytes"] * 1.9 < s["adapter_host_bytes"] \
        < s["adapter_device_bytes"] * 2.1
    assert "adapter weights on the device in f16\n" in st.engine.log_text()


def test_bad_adapter_dtype_refused(engine_bin, model_path):
    r = subprocess.run([engine_bin, "--model", model_path,
                        "--adapter-dtype", "int4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "--adapter-dtype" in r.stderr
