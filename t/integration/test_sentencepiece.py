"""A model with a SentencePiece vocabulary (the kind Llama 2, Mistral and
TinyLlama files carry) served through NGINX: a tiny random Llama model
whose vocabulary tools/make_spm_vocab.py derives from the default
model's, in both layouts (GGUF and a Hugging Face folder with a
SentencePiece-style tokenizer.json), a real llm-engine, the official
openai client.  The text must be llm-run's, token counts exact, streams
whole UTF-8 (byte-fallback tokens put characters together).
"""

import os
import subprocess
import sys

import pytest

from conftest import Engine, build_dir
from nginx_proc import nginx_module, start_nginx  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
NAME = "tiny-spm"
# spaces, a character with a token, one without (byte fallback), emoji
QUESTION = "Hello there, caf\u00e9 \u4e16\u754c \U0001F600?"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "make_spm_vocab.py"),
         str(d / "spm.gguf"), "--model-dir", str(d / "tiny")],
        capture_output=True, text=True, timeout=300)
    if out.returncode == 2:
        pytest.skip("default model not installed")
    assert out.returncode == 0, out.stderr
    return {"gguf": str(d / "tiny" / "model.gguf"),
            "hf": str(d / "tiny" / "hf"), "vocab": str(d / "spm.gguf")}


@pytest.fixture(scope="module", params=["gguf", "hf"])
def served(request, spm_model, nginx_module, tmp_path_factory):
    """(nginx, model path) with the engine and the workers both reading
    the model in one layout."""
    path = spm_model[request.param]
    exe = os.path.join(build_dir(), "llm-engine")
    if not os.access(exe, os.X_OK):
        pytest.skip("%s not built" % exe)
    e = Engine(exe, path, str(tmp_path_factory.mktemp("engine")))
    n = None
    try:
        e.wait_ready()
        n = start_nginx(tmp_path_factory.mktemp("nginx"), e.addr, path,
                        model_name=NAME)
        yield n, path
    finally:
        if n is not None:
            n.stop()
        e.stop()
    n.check_log()


def llm_run(model_path, *args):
    exe = os.path.join(build_dir(), "llm-run")
    out = subprocess.run([exe, "--model", model_path, "--quiet",
                          "--temperature", "0"] + list(args),
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout.decode()


def chat(client, **kw):
    return client.chat.completions.create(
        model=NAME, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": QUESTION}], **kw)


def test_chat_matches_llm_run(served):
    n, path = served
    ref = llm_run(path, "--chat", QUESTION, "--max-tokens", "24")
    r = chat(n.openai())
    assert r.choices[0].message.content == ref[:-1]
    assert r.choices[0].message.content
    ids = llm_run(path, "--chat", QUESTION, "--tokens").split()
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 24 or \
        r.choices[0].finish_reason == "stop"


def test_prompt_tokens_exact(served):
    """BOS added, the space prefix, U+2581 and byte-fallback tokens all
    counted as the engine receives them."""
    n, path = served
    for prompt in ("Hello", " two  spaces", "\u2581x", "\U0001F600\u4e16",
                   "[INST] special text [/INST]"):
        want = len(llm_run(path, "--prompt", prompt, "--tokens").split())
        r = n.openai().completions.create(model=NAME, prompt=prompt,
                                          max_tokens=1, temperature=0)
        assert r.usage.prompt_tokens == want, prompt


def test_stream_is_the_same_text(served):
    n, _ = served
    whole = chat(n.openai()).choices[0].message.content
    parts = []
    for ev in chat(n.openai(), stream=True):
        if ev.choices and ev.choices[0].delta.content:
            parts.append(ev.choices[0].delta.content)
    assert "".join(parts) == whole
    assert len(parts) > 1


def test_completion_matches_llm_run(served):
    n, path = served
    ref = llm_run(path, "--prompt", "Once upon a time", "--max-tokens", "16")
    r = n.openai().completions.create(model=NAME, prompt="Once upon a time",
                                      max_tokens=16, temperature=0)
    assert r.choices[0].text == ref[:-1]


def test_llama2_turns_each_open_with_bos(served):
    """Llama 2's template writes BOS before every user turn; the tokenizer
    adds only the first (llama.cpp's and Hugging Face's prompts), so two
    turns count one prompt each, the answer between them and its EOS."""
    n, _ = served
    c = n.openai()

    def prompt_tokens(messages):
        return c.chat.completions.create(
            model=NAME, messages=messages, max_tokens=1,
            temperature=0).usage.prompt_tokens

    q1, a1, q2 = "first question", "an answer", "second question"
    one = prompt_tokens([{"role": "user", "content": q1}])
    two = prompt_tokens([{"role": "user", "content": q2}])
    # the answer as Llama 2 renders it after [/INST]: " a1 " then </s>;
    # as a completion prompt it gets BOS and the same space prefix
    ans = c.completions.create(model=NAME, prompt=" %s " % a1, max_tokens=1,
                               temperature=0).usage.prompt_tokens - 1
    both = prompt_tokens([{"role": "user", "content": q1},
                          {"role": "assistant", "content": a1},
                          {"role": "user", "content": q2}])
    assert both == one + ans + 1 + two


def test_tokens_from_a_vocabulary_only_file(spm_model):
    """llm-run --tokens reads the tokenizer alone: the vocabulary-only
    GGUF gives the model's ids, the Hugging Face folder too."""
    for prompt in ("Hello there, caf\u00e9 \U0001F600", "[INST] x [/INST]"):
        want = llm_run(spm_model["gguf"], "--prompt", prompt, "--tokens")
        assert llm_run(spm_model["vocab"], "--prompt", prompt,
                       "--tokens") == want
        assert llm_run(spm_model["hf"], "--prompt", prompt,
                       "--tokens") == want
