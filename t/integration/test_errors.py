"""Bad input over raw HTTP (http.client): every error is OpenAI-shaped
JSON, {"error": {"message", "type", "param", "code"}}, with the right
status, and no worker ever crashes (the nginx fixture checks error.log).
"""

import json
import socket

import pytest

from nginx_proc import NGINX, nginx, nginx_module  # noqa: F401

MODEL = "smollm2"
MSGS = [{"role": "user", "content": "Hi"}]


def error_of(status, headers, body, want_status, param=None, code=None):
    assert status == want_status, body
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def chat(nginx, body, **kw):
    return nginx.post("/chat/completions", body, **kw)


# ---- the body ----------------------------------------------------------

@pytest.mark.parametrize("body", [b"{", b"not json", b"{\"model\": }",
                                  b"", b"\xff\xfe", b"[1, 2]", b"\"text\"",
                                  b"{\"model\": \"a\\u0000b\"}"])
def test_invalid_json(nginx, body):
    err = error_of(*chat(nginx, body), 400)
    assert err["type"] == "invalid_request_error"


def test_deeply_nested_json(nginx):
    body = b"[" * 100000 + b"]" * 100000
    error_of(*chat(nginx, body), 400)


def test_body_over_the_limit(nginx):
    big = json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": "x" * (1024 * 1024 + 10)}]})
    error_of(*chat(nginx, big), 413, code="request_too_large")


def test_chunked_body_over_the_limit(nginx):
    s = socket.create_connection(("127.0.0.1", nginx.port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    status = None
    try:
        for _ in range(40):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass            # the server may stop reading
    try:
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            d = s.recv(65536)
            if not d:
                break
            data += d
    except OSError:
        pass
    s.close()
    status = int(data.split(b" ")[1]) if data else None
    assert status == 413


# ---- methods and paths -------------------------------------------------

@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/chat/completions", "POST"),
    ("PUT", "/v1/chat/completions", "POST"),
    ("DELETE", "/v1/completions", "POST"),
    ("POST", "/v1/models", "GET, HEAD"),
    ("DELETE", "/v1/models/smollm2", "GET, HEAD"),
])
def test_wrong_method(nginx, method, path, allow):
    status, headers, body = nginx.request(method, path, b"{}")
    error_of(status, headers, body, 405)
    assert headers["allow"] == allow


def test_unknown_path(nginx):
    error_of(*nginx.request("POST", "/v1/embeddings", b"{}"), 404)


def test_unknown_model(nginx):
    error_of(*chat(nginx, {"model": "gpt-4", "messages": MSGS}), 404,
             param="model", code="model_not_found")
    error_of(*nginx.post("/completions", {"model": "x", "prompt": "a"}),
             404, code="model_not_found")
    error_of(*nginx.request("GET", "/v1/models/gpt-4"), 404,
             code="model_not_found")


# ---- fields ------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("model", 5),
    ("messages", "hello"),
    ("messages", {"role": "user"}),
    ("temperature", "hot"),
    ("temperature", [1]),
    ("top_p", "1"),
    ("max_tokens", "5"),
    ("max_tokens", 2.5),
    ("max_completion_tokens", True),
    ("stream", "yes"),
    ("stream", 1),
    ("seed", "42"),
    ("stop", 5),
    ("stop", ["a", 1]),
    ("logprobs", "yes"),
    ("top_logprobs", "3"),
    ("n", "1"),
    ("presence_penalty", "x"),
    ("user", 42),
    ("stream_options", "yes"),
])
def test_wrong_types(nginx, field, value):
    body = {"model": MODEL, "messages": MSGS, field: value}
    err = error_of(*chat(nginx, body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == field


@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5),
    ("temperature", -1),
    ("top_p", 1.5),
    ("presence_penalty", 3),
    ("frequency_penalty", -2.5),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("top_logprobs", 21),
    ("n", 2),
    ("n", 0),
    ("stop", ["a", "b", "c", "d", "e"]),
])
def test_values_out_of_range(nginx, field, value):
    body = {"model": MODEL, "messages": MSGS, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    error_of(*chat(nginx, body), 400, param=field)


def test_missing_fields(nginx):
    error_of(*chat(nginx, {"messages": MSGS}), 400, param="model",
             code="missing_required_parameter")
    error_of(*chat(nginx, {"model": MODEL}), 400, param="messages",
             code="missing_required_parameter")
    error_of(*nginx.post("/completions", {"model": MODEL}), 400,
             param="prompt")


def test_empty_messages(nginx):
    error_of(*chat(nginx, {"model": MODEL, "messages": []}), 400,
             param="messages")


@pytest.mark.parametrize("msg", [
    {"role": "wizard", "content": "hi"},
    {"role": "", "content": "hi"},
    {"role": 3, "content": "hi"},
    {"content": "hi"},
    {"role": "user"},
    {"role": "user", "content": None},
    {"role": "user", "content": 42},
    {"role": "user", "content": [{"type": "image_url",
                                  "image_url": {"url": "x"}}]},
    "just a string",
])
def test_bad_messages(nginx, msg):
    err = error_of(*chat(nginx, {"model": MODEL, "messages": [msg]}), 400)
    assert err["param"] == "messages"


def test_unknown_role_message(nginx):
    err = error_of(*chat(nginx, {"model": MODEL, "messages": [
        {"role": "robot", "content": "hi"}]}), 400, param="messages")
    assert "robot" in err["message"]


def test_client_text_stays_on_its_log_line(nginx):
    """Error messages quote what the client sent (the model name, a role)
    and go to error.log at info: a newline there must not start a line of
    the client's writing (e.g. a forged "[alert] ... exited on signal")."""
    tag = "FORGED-LINE-7431"
    error_of(*chat(nginx, {"model": "x\n" + tag, "messages": MSGS}), 404)
    error_of(*chat(nginx, {"model": MODEL, "messages": [
        {"role": "x\r\n" + tag, "content": "Hi"}]}), 400)
    log = nginx.error_log_text()
    assert not [ln for ln in log.splitlines() if ln.startswith(tag)]
    # the messages are logged, escaped
    assert "x\\x0a" + tag in log
    assert "x\\x0d\\x0a" + tag in log


def test_parameter_combinations(nginx):
    error_of(*chat(nginx, {"model": MODEL, "messages": MSGS,
                           "stream_options": {"include_usage": True}}),
             400, param="stream_options")
    error_of(*chat(nginx, {"model": MODEL, "messages": MSGS,
                           "top_logprobs": 2}), 400, param="top_logprobs")
    error_of(*chat(nginx, {"model": MODEL, "messages": MSGS,
                           "tools": [{"type": "function"}]}), 400,
             param="tools")


def test_bad_prompts(nginx):
    for prompt, param in [(5, "prompt"), ([], "prompt"),
                          (["a", "b"], "prompt"), ([1, -1], "prompt"),
                          ([10 ** 9], "prompt"), ({"a": 1}, "prompt")]:
        error_of(*nginx.post("/completions", {"model": MODEL,
                                              "prompt": prompt}),
                 400, param=param)


# ---- the context -------------------------------------------------------

def test_context_exceeded_by_max_tokens(nginx):
    err = error_of(*chat(nginx, {"model": MODEL, "messages": MSGS,
                                 "max_tokens": 10 ** 7}),
                   400, code="context_length_exceeded")
    assert "maximum context length" in err["message"]


def test_context_exceeded_by_the_prompt(nginx):
    long = "word " * 20000          # well over 8192 tokens
    error_of(*chat(nginx, {"model": MODEL, "messages": [
        {"role": "user", "content": long}]}), 400,
        code="context_length_exceeded")
    error_of(*nginx.post("/completions", {"model": MODEL, "prompt": long,
                                          "max_tokens": 1}),
             400, code="context_length_exceeded")


def test_worker_survives_all_of_it(nginx):
    status, _, _ = nginx.request("GET", "/v1/models")
    assert status == 200
    nginx.check_log()


# ---- bad configuration fails at nginx -t --------------------------------

@pytest.mark.parametrize("http_extra,location_extra,model,expect", [
    ("", "", "/nonexistent/model.gguf", "llm_model"),
    ("llm_engine_timeout soon;", "", None, "invalid value"),
    ("", "llm_max_tokens_default 0;", None, "must be between 1"),
    ("", "llm_api openai;", None, "is duplicate"),
    ("", "llm_max_body lots;", None, "invalid value"),
    ("llm_model other /x.gguf;", "", None, "is duplicate"),
    ("llm_engine localhost;", "", None, "no port"),
])
def test_bad_config_fails_nginx_t(nginx_module, model_path, tmp_path,
                                  http_extra, location_extra, model,
                                  expect):
    from nginx_proc import Nginx
    n = Nginx(tmp_path, "unix:%s/e.sock" % tmp_path, model or model_path,
              http_extra=http_extra, location_extra=location_extra)
    t = n.test_config()
    assert t.returncode != 0
    assert expect in t.stderr, t.stderr
    assert "[emerg]" in t.stderr


def test_llm_api_needs_llm_model(nginx_module, tmp_path):
    conf = tmp_path / "nginx.conf"
    from nginx_proc import module_path
    conf.write_text("""
load_module %s;
error_log %s/error.log;
pid %s/nginx.pid;
events {}
http {
    llm_engine unix:/tmp/none.sock;
    server { listen 127.0.0.1:1; location /v1/ { llm_api openai; } }
}
""" % (module_path(), tmp_path, tmp_path))
    import subprocess
    t = subprocess.run([NGINX, "-p", str(tmp_path), "-c",
                        str(conf), "-t"], capture_output=True, text=True)
    assert t.returncode != 0
    assert "requires \"llm_model\"" in t.stderr
