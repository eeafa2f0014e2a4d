#!/usr/bin/env python3
"""Fixtures for the tokenizer and chat-template unit tests.

    tools/gen_tokenizer_fixtures.py                 # everything below
    tools/gen_tokenizer_fixtures.py --tokenizer     # t/fixtures/tokenizer/
    tools/gen_tokenizer_fixtures.py --chat          # t/fixtures/chat/
    tools/gen_tokenizer_fixtures.py --spm           # .../tokenizer/spm.txt
    tools/gen_tokenizer_fixtures.py --hf-json DIR [--hf-pre NAME]

--tokenizer encodes a varied corpus with llama.cpp (llama-cpp-python) on
the default model (tools/default-model.sh) and writes the expected ids to
t/fixtures/tokenizer/smollm2.txt.  The same vocabulary is also run through
llama.cpp's other pre-tokenizers by writing vocab-only copies of the GGUF
with another tokenizer.ggml.pre ("gpt2", "llama-bpe", "qwen2", "default").

--spm does the same for a SentencePiece vocabulary (GGUF model "llama",
as Llama 2 and Mistral files have) that tools/make_spm_vocab.py derives
from the default model: t/fixtures/tokenizer/spm.txt, pre-tokenizer "spm";
and, with Hugging Face's tokenizers package (pip install tokenizers) as
the reference, spm_hf.txt for tokenizer.json files of that vocabulary.

Line format (no JSON needed to read it):

    enc <pre> <add_special> <parse_special> <input hex or -> : <ids>
    piece <id> <special> <bytes hex or ->

--hf-json writes tokenizer.json + tokenizer_config.json built from the GGUF
vocabulary (used by the C test at run time to check the Hugging Face
loader against the same fixtures).

--chat renders conversations with jinja2 (the way transformers'
apply_chat_template does: sandboxed, trim_blocks, lstrip_blocks) for the
model's own template and for representative templates of other families,
and writes t/fixtures/chat/<name>.tmpl and <name>.txt:

    case <add_generation_prompt> <bos hex or -> <eos hex or ->
    msg <role> <content hex or ->
    expect <output hex or -> | error
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_model():
    out = subprocess.run([os.path.join(ROOT, "tools", "default-model.sh")],
                         capture_output=True, text=True)
    path = out.stdout.strip()
    if out.returncode != 0 or not path:
        sys.exit("default model not found (tools/default-model.sh)")
    return path


def hx(b):
    return b.hex() if b else "-"


# ----------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------

PROSE = (
    "It was the best of times, it was the worst of times, it was the age "
    "of wisdom, it was the age of foolishness, it was the epoch of belief, "
    "it was the epoch of incredulity, it was the season of Light, it was "
    "the season of Darkness, it was the spring of hope, it was the winter "
    "of despair.")

PYTHON = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
    print([fib(i) for i in range(10)])  # 0 1 1 2 3 5 ...
'''

C_CODE = '''#include <stdio.h>

static int
sum(const int *v, size_t n)
{
\tint s = 0;
\tfor (size_t i = 0; i < n; i++) {
\t\ts += v[i];
\t}
\treturn s;
}
'''

JS = ("const add = (a, b) => a + b;\nlet s = `sum=${add(1, 2)}`;\n"
      "if (s !== 'sum=3') { throw new Error(\"bad\"); }\n")

RUST = ("fn main() {\n    let v: Vec<u32> = (1..=10).collect();\n"
        "    println!(\"{:?} {}\", v, v.iter().sum::<u32>());\n}\n")

HTML = ('<!DOCTYPE html>\n<html lang="en">\n  <body>\n    '
        '<p class="x">Hi &amp; bye</p>\n  </body>\n</html>\n')

JSON_TEXT = '{"name": "SmolLM2", "params": 135000000, "tags": ["a", "b"], '\
            '"nested": {"ok": true, "none": null}}'

SHELL = ("for f in *.txt; do\n  wc -l \"$f\" | awk '{print $1}' >> out.log\n"
         "done\n")

SQL = ("SELECT u.id, COUNT(*) AS n FROM users u JOIN orders o ON o.uid = u.id"
       "\nWHERE o.total > 100.50 GROUP BY u.id HAVING n >= 3;")

MARKDOWN = ("# Title\n\n- item one\n- **bold** and _italic_\n\n```py\n"
            "x = 1\n```\n\n> quote\n")

CORPUS = [
    # ASCII prose and whitespace
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    PROSE,
    " leading space",
    "trailing spaces   ",
    "  two leading spaces",
    "multiple   spaces   inside",
    "tabs\tand\t\ttabs\t",
    "line1\nline2\n\nline4\r\nwindows\r\n",
    "\n\n\n",
    " ",
    "   ",
    "\t",
    "",
    "\n\n\n\n    indented code\n\tand tab\n  \n",
    " " * 32,
    "a" * 40,
    "end with newline\n",
    "space then newline \n next",
    # contractions
    "I'm sure you'll see we've done it, they're here, she'd go, it's John's",
    "I'M SURE YOU'LL SEE WE'VE DONE IT, DON'T",
    "'s 's's ''s ' 'x 'S 'Re 'lL",
    "don't can't won't shouldn't y'all",
    # digits and numbers
    "1234567890",
    "3.14159265358979",
    "The year 2024 had 365 days and 8760 hours",
    "Phone: +1 (555) 123-4567",
    "1,000,000 and 1.000.000 and 1 000 000",
    "\u0663\u0664\u0665 \u0661\u0662\u0663 \u00bd \u00b2 \u216b \u2460",
    "12345678901234567890123",
    "v1.2.3-beta4 x86_64 0xDEADBEEF 1e-10",
    # code
    PYTHON, C_CODE, JS, RUST, HTML, JSON_TEXT, SHELL, SQL, MARKDOWN,
    # punctuation
    "Hello!!! What??? ... --- *** ###",
    "a+b=c; x<y>z; a|b^c~d`e$f @g #h %i &j",
    "(parens) [brackets] {braces} <angles>",
    "quotes \u201csmart\u201d \u2018single\u2019 \u00abguillemets\u00bb "
    "\u201eGerman\u201c",
    "em dash \u2014 en dash \u2013 ellipsis \u2026 bullet \u2022",
    "https://example.com/path/to?query=1&b=2#frag",
    "john.doe+tag@example.co.uk",
    "\u2211_{i=1}^{n} x_i\u00b2 \u2264 \u221e \u222b \u221a2 \u03c0 "
    "\u2248 3.14",
    # emoji
    "I love \U0001f999 and \U0001f40d!",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family, "
    "\U0001f1fa\U0001f1f8\U0001f1eb\U0001f1f7 flags, \U0001f44d\U0001f3fd",
    "\U0001f600\U0001f603\U0001f604\U0001f601",
    # scripts
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u7231\u81ea\u7136\u8bed"
    "\u8a00\u5904\u7406\u3002",
    "\u3053\u3093\u306b\u3061\u306f\u3001\u4e16\u754c\u3002\u30ab\u30bf"
    "\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3001\u6f22\u5b57\u3002",
    "\uc548\ub155\ud558\uc138\uc694 \uc138\uacc4",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644"
    "\u0645",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0421"
    "\u044a\u0435\u0448\u044c \u0436\u0435 \u0435\u0449\u0451 \u044d"
    "\u0442\u0438\u0445 \u043c\u044f\u0433\u043a\u0438\u0445 \u0431"
    "\u0443\u043b\u043e\u043a.",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f"
    "\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25"
    "\u0e01",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc"
    "\u03b5",
    "English\u4e2d\u6587\u0420\u0443\u0441\u0441\u043a\u0438\u0439123"
    "\u0639\u0631\u0628\u064a",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
    "e\u0301 a\u0300 n\u0303",
    # Unicode 15.0/15.1 additions (CJK ext H and I, Kannada, Kawi)
    "\U00031350\U00031351 \U0002ebf0 \u0cf3 \U00011f04\U00011f05",
    # whitespace and controls
    "a\u00a0b\u2003c\u3000d",
    "x\u0085y\u2028z\u2029w",
    "\x1c\x1d\x1e\x1f sep",
    "\x00\x01\x7f ctl",
    "\ufeffHello BOM",
    "a\u200bb\u200dc zero width",
    "\ue000 private \U000f0000 \ufffe \U000e0001",
    "HELLO World's IT'S",
]

INVALID = [
    b"\xff",
    b"abc\x80def",
    b"trunc \xc3",
    b"\xc3\x28 bad continuation",
    b"\xe2\x82",
    b"\xed\xa0\x80 surrogate",
    b"\xc0\xaf overlong",
    b"\xf0\x9f\x98 ok",
    b"\xfe\xfe\xff\xff",
    b"mixed \xe4\xbd\xa0\xe5\xa5 \x80\x80 end",
]

SPECIAL = [
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>text",
    "<|im_start|><|im_start|>",
    "<|im_start partial <|im_end",
    "<repo_name>name<file_sep>file<reponame>",
    "<jupyter_code>print(1)<jupyter_output> 1 <empty_output>",
    " <|im_start|> spaced <|im_end|> ",
]


# SentencePiece: special texts of tools/make_spm_vocab.py's vocabulary and
# the spaces, bytes and fragments its leading-space rule touches.
SPM_SPECIAL = [
    "<s>[INST] Hello [/INST] Hi</s><s>[INST] again [/INST]",
    "<|user|>\nHello<|assistant|>\nHi",
    "a<s>b", "a <s> b", "<s>", "</s>", "<unk>", "<unused0>",
    "[INST][INST]", " [INST]  spaced  [/INST] ",
]
SPM_EXTRA = [b"", b" ", b"  ", b"   a", b"a ", b"\n", b"\t x", b"q", b"\xe2\x96\x81",
             b"\xe2\x96\x81 \xe2\x96\x81x", b"\xe2\x96", b"a\xe0b", b"\xf4\x8f\xbf\xbf",
             "\U0001F600\U0001F601 \u4e16\u754c".encode()]


def corpus_bytes():
    cases = [s.encode("utf-8") for s in CORPUS]
    long_text = "\n\n".join([PROSE, PYTHON] + [c for c in CORPUS
                                                if not c.isascii()][:12]
                              + [JS, C_CODE] * 3)
    cases.append(long_text.encode("utf-8"))
    cases += INVALID
    return cases


# ----------------------------------------------------------------------
# llama.cpp side
# ----------------------------------------------------------------------

def gguf_fields(path):
    import gguf
    r = gguf.GGUFReader(path)
    return r


def read_vocab(path):
    """tokens (str), types (int), merges (str) of a GGUF file."""
    r = gguf_fields(path)
    f = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    f = r.fields["tokenizer.ggml.merges"]
    merges = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    scal = {}
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        if key in r.fields:
            fl = r.fields[key]
            v = fl.parts[fl.data[0]]
            scal[key] = (bytes(v).decode("utf-8") if key.endswith("template")
                         else int(v[0]))
    return tokens, types, merges, scal


def write_variant(src, dst, pre):
    """A vocab-only copy of src with tokenizer.ggml.pre = pre."""
    import gguf
    r = gguf.GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[
        r.fields["general.architecture"].data[0]]).decode()
    w = gguf.GGUFWriter(dst, arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "tokenizer.ggml.pre":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            st = f.types[1]
            if st == gguf.GGUFValueType.STRING:
                val = [bytes(f.parts[i]) for i in f.data]
            else:
                val = [f.parts[i][0].item() for i in f.data]
            w.add_key_value(key, val, t, sub_type=st)
        elif t == gguf.GGUFValueType.STRING:
            w.add_key_value(key, bytes(f.parts[f.data[0]]), t)
        else:
            w.add_key_value(key, f.parts[f.data[0]][0].item(), t)
    w.add_key_value("tokenizer.ggml.pre", pre, gguf.GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load_llama(path):
    from llama_cpp import Llama
    return Llama(model_path=path, vocab_only=True, verbose=False)


def gen_tokenizer(model, out_dir):
    import llama_cpp
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# generated by tools/gen_tokenizer_fixtures.py: llama.cpp "
             "(llama-cpp-python %s) on %s" % (llama_cpp.__version__,
                                              os.path.basename(model)),
             "# enc <pre> <add_special> <parse_special> <input hex> : <ids>",
             "# piece <id> <special> <bytes hex>"]
    cases = corpus_bytes()
    specials = [s.encode() for s in SPECIAL]
    m = load_llama(model)
    n_enc = 0

    def enc(llm, pre, data, add, parse):
        ids = llm.tokenize(data, add_bos=bool(add), special=bool(parse))
        lines.append("enc %s %d %d %s : %s" % (pre, add, parse, hx(data),
                                               " ".join(map(str, ids))))

    for c in cases:
        enc(m, "smollm", c, 0, 0)
        enc(m, "smollm", c, 1, 1)
        n_enc += 2
    for c in specials:
        for add in (0, 1):
            for parse in (0, 1):
                enc(m, "smollm", c, add, parse)
                n_enc += 1

    # pieces: control tokens, byte tokens, a spread of ids
    vocab = llama_cpp.llama_model_get_vocab(m.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    ids = list(range(0, 40)) + list(range(40, n_vocab, 97)) + [n_vocab - 1]
    buf = (ctypes.c_char * 512)()
    for i in ids:
        for special in (0, 1):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, 512, 0,
                                               bool(special))
            assert n >= 0
            lines.append("piece %d %d %s" % (i, special, hx(bytes(buf[:n]))))
    del m

    with tempfile.TemporaryDirectory() as tmp:
        for pre in ("gpt-2", "llama-bpe", "qwen2", "default", "deepseek-coder"):
            path = os.path.join(tmp, "v.gguf")
            write_variant(model, path, pre)
            v = load_llama(path)
            for c in cases + specials:
                enc(v, pre, c, 0, 1)
                n_enc += 1
            del v
    out = os.path.join(out_dir, "smollm2.txt")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("%s: %d encodings, %d pieces" % (out, n_enc, 2 * len(ids)))


def gen_spm(out_dir):
    """t/fixtures/tokenizer/spm.txt: llama.cpp's ids and pieces for the
    SentencePiece vocabulary tools/make_spm_vocab.py derives from the
    default model."""
    import llama_cpp
    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "spm.gguf")
        subprocess.check_call([sys.executable,
                               os.path.join(ROOT, "tools", "make_spm_vocab.py"),
                               vocab])
        m = load_llama(vocab)
        lines = ["# generated by tools/gen_tokenizer_fixtures.py --spm: "
                 "llama.cpp (llama-cpp-python %s) on the vocabulary of "
                 "tools/make_spm_vocab.py" % llama_cpp.__version__,
                 "# enc <pre> <add_special> <parse_special> <input hex> : <ids>",
                 "# piece <id> <special> <bytes hex>"]
        cases = (corpus_bytes() + [c.encode() for c in SPECIAL]
                 + [c.encode() for c in SPM_SPECIAL] + SPM_EXTRA)
        for c in cases:
            for add in (0, 1):
                for parse in (0, 1):
                    ids = m.tokenize(c, add_bos=bool(add), special=bool(parse))
                    lines.append("enc spm %d %d %s : %s" % (
                        add, parse, hx(c), " ".join(map(str, ids))))
        vocab_h = llama_cpp.llama_model_get_vocab(m.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab_h)
        ids = list(range(0, 300)) + list(range(300, n_vocab, 89)) \
            + [n_vocab - 1]
        buf = (ctypes.c_char * 512)()
        for i in ids:
            for special in (0, 1):
                n = llama_cpp.llama_token_to_piece(vocab_h, i, buf, 512, 0,
                                                   bool(special))
                assert n >= 0
                lines.append("piece %d %d %s" % (i, special,
                                                 hx(bytes(buf[:n]))))
        del m
    out = os.path.join(out_dir, "spm.txt")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("%s: %d encodings, %d pieces" % (out, 4 * len(cases), 2 * len(ids)))
    gen_spm_hf(out_dir, cases)


def gen_spm_hf(out_dir, cases):
    """t/fixtures/tokenizer/spm_hf.txt: Hugging Face tokenizers' ids for
    tokenizer.json files of the same vocabulary in each layout
    tools/make_spm_vocab.py --hf-style writes (pre-tokenizer column
    "hf-<style>"; no special tokens added, special texts recognised, as
    tokenizers does; valid UTF-8 inputs only)."""
    import tokenizers
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_tiny_model
    lines = ["# generated by tools/gen_tokenizer_fixtures.py --spm: Hugging "
             "Face tokenizers %s on tokenizer.json files of "
             "tools/make_spm_vocab.py --hf-json" % tokenizers.__version__,
             "# enc <pre> <add_special> <parse_special> <input hex> : <ids>"]
    texts = []
    for c in cases:
        try:
            texts.append(c.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    for style in make_tiny_model.SPM_STYLES:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.check_call([
                sys.executable, os.path.join(ROOT, "tools",
                                             "make_spm_vocab.py"),
                os.path.join(tmp, "spm.gguf"), "--hf-json", tmp,
                "--hf-style", style], stdout=subprocess.DEVNULL)
            tok = tokenizers.Tokenizer.from_file(
                os.path.join(tmp, "tokenizer.json"))
            for text in texts:
                ids = tok.encode(text, add_special_tokens=False).ids
                lines.append("enc hf-%s 0 1 %s : %s" % (
                    style, hx(text.encode()), " ".join(map(str, ids))))
    out = os.path.join(out_dir, "spm_hf.txt")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("%s: %d encodings" % (out, len(lines) - 2))


# ----------------------------------------------------------------------
# tokenizer.json from the GGUF vocabulary
# ----------------------------------------------------------------------

LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
             "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
             "\\s+(?!\\S)|\\s+")
QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
            "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
            "\\s+(?!\\S)|\\s+")


def gen_hf_json(model, out_dir, pre):
    tokens, types, merges, scal = read_vocab(model)
    os.makedirs(out_dir, exist_ok=True)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False,
                  "trim_offsets": True, "use_regex": True}
    if pre == "smollm":
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre == "gpt2":
        pre_tok = byte_level
    elif pre in ("llama-bpe", "qwen2"):
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Split",
             "pattern": {"Regex": LLAMA3_RE if pre == "llama-bpe"
                         else QWEN2_RE},
             "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    else:
        sys.exit("unknown --hf-pre %s" % pre)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    # one form of merges for each variant, to cover both
    if pre == "smollm":
        merge_list = merges
    else:
        merge_list = [m.split(" ", 1) for m in merges]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False,
                  "ignore_merges": pre == "llama-bpe",
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": merge_list},
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(doc, f, ensure_ascii=False)
    cfg = {
        "add_prefix_space": False,
        "bos_token": tokens[scal["tokenizer.ggml.bos_token_id"]],
        "eos_token": {"content": tokens[scal["tokenizer.ggml.eos_token_id"]],
                      "lstrip": False, "rstrip": False, "special": True},
        "add_bos_token": False,
        "chat_template": scal.get("tokenizer.chat_template"),
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)


# ----------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------

CHAT_DIR = os.path.join(ROOT, "t", "fixtures", "chat")

# Representative templates of each family, as their model cards ship them
# (the family's Hugging Face tokenizer_config.json chat_template).
TEMPLATES = {}

TEMPLATES["chatml"] = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

TEMPLATES["llama3"] = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

TEMPLATES["llama31"] = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions." }}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TEMPLATES["llama2"] = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = "
    "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

_MISTRAL_HEAD = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
"""
_MISTRAL_TAIL = """    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

TEMPLATES["mistral-v1"] = _MISTRAL_HEAD + """            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
""" + _MISTRAL_TAIL

TEMPLATES["mistral-v3"] = _MISTRAL_HEAD + """            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
""" + _MISTRAL_TAIL

TEMPLATES["mistral-v3-tekken"] = _MISTRAL_HEAD + """            {{- '[INST]' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token}}
""" + _MISTRAL_TAIL

TEMPLATES["mistral-v7"] = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

TEMPLATES["mistral-v7-tekken"] = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

TEMPLATES["mistral-legacy"] = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
    "roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
    "user and assistant roles are supported!') }}{% endif %}{% endfor %}")

TEMPLATES["gemma"] = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

TEMPLATES["phi3"] = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] "
    "+ '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}")

TEMPLATES["zephyr"] = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""


# family name (llm_chat_name) each template must be detected as
KINDS = {
    "smollm2": "chatml", "chatml": "chatml", "llama3": "llama3",
    "llama31": "llama3.1", "llama2": "llama2", "mistral-v1": "mistral-v1",
    "mistral-v3": "mistral-v3", "mistral-v3-tekken": "mistral-v3-tekken",
    "mistral-v7": "mistral-v7", "mistral-v7-tekken": "mistral-v7-tekken",
    "mistral-legacy": "mistral", "gemma": "gemma", "phi3": "phi3",
    "zephyr": "zephyr",
}

S, U, A = "system", "user", "assistant"
CONVERSATIONS = [
    [(U, "Hello!")],
    [(S, "You are terse."), (U, "What is 2+2?")],
    [(S, "Be brief. "), (U, " Hi there \n"), (A, "Hello!"), (U, "2+2?")],
    [(U, "Tell me a joke."), (A, "Why did the chicken cross the road?"),
     (U, "Why?")],
    [(U, "\u3000 spaced\tout \n\n"), (A, "  ok  "), (U, "\n")],
    [(U, "")],
    [(U, "first"), (U, "second")],
    [(A, "I start."), (U, "Fine.")],
    [(S, "Syst\u00e8me \U0001f999"), (U, "\u4f60\u597d, \u043c\u0438\u0440!")],
    [(S, "only a system message")],
    [(U, "multi\nline\n  message\n"), (A, "reply\n\n"), (U, "<b>tags</b> & 'quotes' \"q\"")],
]


def render(env, tmpl, conv, gen, bos, eos):
    from jinja2.exceptions import TemplateError
    msgs = [{"role": r, "content": c} for r, c in conv]
    try:
        return env.from_string(tmpl).render(
            messages=msgs, add_generation_prompt=gen, bos_token=bos,
            eos_token=eos).encode("utf-8")
    except TemplateError:
        return None


def gen_chat(model):
    """Renders CONVERSATIONS with each template the way transformers'
    apply_chat_template does."""
    import jinja2
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    templates = dict(TEMPLATES)
    templates["smollm2"] = read_vocab(model)[3]["tokenizer.chat_template"]
    os.makedirs(CHAT_DIR, exist_ok=True)
    total = 0
    for name, tmpl in sorted(templates.items()):
        bos = "<|begin_of_text|>" if name.startswith("llama3") else "<s>"
        eos = "<|endoftext|>" if name == "phi3" else "</s>"
        lines = ["# rendered by jinja2 %s as transformers' apply_chat_template"
                 " (tools/gen_tokenizer_fixtures.py)" % jinja2.__version__,
                 "kind %s" % KINDS[name]]
        for conv in CONVERSATIONS:
            if name == "mistral-legacy" and conv[0][0] == S:
                continue        # that template refuses system messages
            for gen in (0, 1):
                out = render(env, tmpl, conv, bool(gen), bos, eos)
                lines.append("case %d %s %s" % (gen, hx(bos.encode()),
                                                hx(eos.encode())))
                for r, c in conv:
                    lines.append("msg %s %s" % (r, hx(c.encode("utf-8"))))
                lines.append("expect " + ("error" if out is None else hx(out)))
                total += 1
        with open(os.path.join(CHAT_DIR, name + ".tmpl"), "w") as f:
            f.write(tmpl)
        with open(os.path.join(CHAT_DIR, name + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print("%s: %d templates, %d renderings" % (CHAT_DIR, len(templates),
                                              total))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF file (default: the default model)")
    ap.add_argument("--tokenizer", action="store_true")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--spm", action="store_true",
                    help="the SentencePiece fixtures (spm.txt)")
    ap.add_argument("--hf-json", metavar="DIR")
    ap.add_argument("--hf-pre", default="smollm")
    args = ap.parse_args()
    model = args.model or default_model()
    if args.hf_json:
        gen_hf_json(model, args.hf_json, args.hf_pre)
        return
    both = not args.tokenizer and not args.chat and not args.spm
    if args.tokenizer or both:
        gen_tokenizer(model, os.path.join(ROOT, "t", "fixtures", "tokenizer"))
    if args.spm or both:
        gen_spm(os.path.join(ROOT, "t", "fixtures", "tokenizer"))
    if args.chat or both:
        gen_chat(model)


if __name__ == "__main__":
    main()
