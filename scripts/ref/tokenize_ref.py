#!/usr/bin/env python3
"""Reference tokenizations and chat-template renderings from llama.cpp, for
the tokenizer crate's tests.

Run with the llama-cpp-python venv (scripts/setup-llama-cpp.sh):

    ~/.cache/worker-orcd/llama-venv/bin/python scripts/ref/tokenize_ref.py

It writes, under crates/tokenizer/tests/fixtures/:

  tokenize_smollm2.json, tokenize_gemma3.json
      for each of the two test models (WORKER_ORCD_MODELS, default
      ~/.cache/worker-orcd/models): llama.cpp's ids for a set of texts under
      every add_special/parse_special combination, llama_detokenize of those
      ids (remove_special=false, unparse_special=false/true), the pieces of a
      sample of ids, and the vocabulary's special ids and end-of-generation set.
  chat_templates.json
      conversations rendered by llama-cpp-python's Jinja2ChatFormatter (Python
      jinja2, as llama-cpp-python renders a GGUF's template) with SmolLM2's
      template from its GGUF and the templates in fixtures/templates/.

The test texts are in this file so that the fixture is reproducible from it.
"""
import ctypes
import hashlib
import json
import os
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates/tokenizer/tests/fixtures"
MODELS_DIR = Path(os.environ.get("WORKER_ORCD_MODELS", Path.home() / ".cache/worker-orcd/models"))
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}

LONG_UNIT = (
    "<|im_start|>user\nThe quick brown fox jumps over the lazy dog; it's 12:45 and 3.14159 ≈ π.\n"
    "fn main() {\n    let xs: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{xs:?}\");\n}\n"
    "東京は日本の首都です。 Ünïcödé àccents, emoji 🦙🚀, and    runs of   spaces.\t\tTabs too.<|im_end|>\n"
)

TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    " \n \n",
    "Hello world",
    " Hello world",
    "Hello, world! How are you doing today?",
    "I'm sure we'll see they've done it, can't you? WE'LL SEE. It's 'quoted'.",
    "The year 2024 had 366 days; 1234567890 and 3.14159, -42, 1e-9, 0x1F.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<_> = (0..10).collect();\n\tprintln!(\"{:?}\", v);\n}\n",
    "    four leading spaces and trailing spaces    ",
    "a  b   c    d     e\t\tf\n\ng",
    "line one\r\nline two\r\n",
    "東京は日本の首都です。北京是中国的首都。",
    "한국어 텍스트와 日本語のテキスト",
    "Привет, мир! Ελληνικά. العربية. हिन्दी. ไทย",
    "emoji: 🦙🚀😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ✅",
    "Äpfel, café, naïve, façade, Ångström, e\u0301 (combining), ﬁ ligature",
    "non-breaking\u00a0space, ideographic\u3000space, thin\u2009space, zero\u200bwidth",
    "math: ∀x ∈ ℝ, ∑ᵢ xᵢ² ≤ ∞; arrows → ⇒ ↔",
    "https://example.com/path?query=1&b=two#frag <b>bold</b> **markdown** `code`",
    '{"key": [1, 2, {"nested": null}], "s": "a\\"b"}',
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|im_start|>",
    "text <|im_start incomplete and <|im_end|>complete",
    "<|endoftext|>after",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad> and <unk>",
    "control\u0001char and \u0000 nul and \u007f del",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕗𝕒𝕟𝕔𝕪 and rare 𓀀 hieroglyph",
    "x" * 300,
    "1" * 40,
    "!!!???...,,,;;;:::",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
    LONG_UNIT * 16,
]

COMBOS = [(False, False), (True, False), (False, True), (True, True)]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def detokenize(vocab, ids, special):
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, special)
    assert n >= 0, n
    return buf.raw[:n]


def piece(vocab, token, special):
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, 512, 0, special)
    assert n >= 0, n
    return buf.raw[:n]


def as_text(data: bytes):
    """Bytes as a string when they are UTF-8, else as a list of byte values."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


def tokenize_fixture(name, file):
    path = MODELS_DIR / file
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    opt = lambda t: None if t < 0 else t
    cases = []
    used = set()
    for text in TEXTS:
        for add_special, parse_special in COMBOS:
            if len(text) > 1000 and not (add_special and parse_special):
                continue
            ids = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
            used.update(ids)
            cases.append({
                "text": text,
                "add_special": add_special,
                "parse_special": parse_special,
                "ids": ids,
                "decoded": as_text(detokenize(vocab, ids, False)),
                "decoded_special": as_text(detokenize(vocab, ids, True)),
            })
    sample = sorted(used | set(range(0, min(n_vocab, 300))) | set(range(0, n_vocab, 997)) | {n_vocab - 1})
    pieces = [{"id": t, "piece": as_text(piece(vocab, t, False)), "piece_special": as_text(piece(vocab, t, True))}
              for t in sample]
    return {
        "model": file,
        "sha256": sha256(path),
        "generated_by": f"scripts/ref/tokenize_ref.py with llama-cpp-python {llama_cpp.__version__}",
        "n_vocab": n_vocab,
        "bos": opt(llama_cpp.llama_vocab_bos(vocab)),
        "eos": opt(llama_cpp.llama_vocab_eos(vocab)),
        "eot": opt(llama_cpp.llama_vocab_eot(vocab)),
        "pad": opt(llama_cpp.llama_vocab_pad(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog": [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        "cases": cases,
        "pieces": pieces,
    }


CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "You are a poet."},
        {"role": "user", "content": "Write a line about the sea."},
        {"role": "assistant", "content": "The sea hums blue beneath the gull."},
        {"role": "user", "content": "Another, about the moon?"},
    ],
    "no_system_multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "whitespace_unicode": [
        {"role": "user", "content": "  Ünïcödé 🦙 with spaces \n\n"},
    ],
    "not_alternating": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
}

QWEN_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, in °C.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}},
            "required": ["city"],
        },
    },
}]
QWEN_TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}}]},
    {"role": "tool", "content": "{\"temp\": 21.5}"},
    {"role": "tool", "content": "{\"temp\": 19}"},
]


def render(template, bos, eos, messages, add_generation_prompt, **kwargs):
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                    add_generation_prompt=add_generation_prompt)
    try:
        return {"prompt": formatter(messages=messages, **kwargs).prompt}
    except Exception as e:  # raise_exception, or an error in the template
        return {"error": f"{type(e).__name__}: {e}"}


def chat_fixture():
    llm = llama_cpp.Llama(model_path=str(MODELS_DIR / MODELS["smollm2"]), vocab_only=True, verbose=False)
    smollm_template = llm.metadata["tokenizer.chat_template"]
    templates = {
        # name: (template source, where the test takes it from, bos, eos)
        "smollm2": (smollm_template, "gguf:" + MODELS["smollm2"], "<|im_start|>", "<|im_end|>"),
    }
    for name, bos, eos in [("qwen2.5", "<|endoftext|>", "<|im_end|>"), ("gemma3", "<bos>", "<eos>"),
                           ("gemma2", "<bos>", "<eos>"), ("chatml", "", "")]:
        templates[name] = ((FIXTURES / "templates" / f"{name}.jinja").read_text(), f"templates/{name}.jinja", bos, eos)
    out = []
    for name, (source, origin, bos, eos) in templates.items():
        for conv_name, messages in CONVERSATIONS.items():
            for generation in (True, False):
                out.append({"template": name, "source": origin, "bos_token": bos, "eos_token": eos,
                            "conversation": conv_name, "messages": messages, "add_generation_prompt": generation,
                            **render(source, bos, eos, messages, generation)})
    for generation in (True, False):
        out.append({"template": "qwen2.5", "source": "templates/qwen2.5.jinja", "bos_token": "<|endoftext|>",
                    "eos_token": "<|im_end|>", "conversation": "tools", "messages": QWEN_TOOL_CHAT, "tools": QWEN_TOOLS,
                    "add_generation_prompt": generation,
                    **render(templates["qwen2.5"][0], "<|endoftext|>", "<|im_end|>", QWEN_TOOL_CHAT, generation,
                             tools=QWEN_TOOLS)})
    return {"generated_by": "scripts/ref/tokenize_ref.py: llama_cpp.llama_chat_format.Jinja2ChatFormatter, "
                            f"llama-cpp-python {llama_cpp.__version__}",
            "renders": out}


def write(name, value):
    path = FIXTURES / name
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main():
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, file in MODELS.items():
        write(f"tokenize_{name}.json", tokenize_fixture(name, file))
    write("chat_templates.json", chat_fixture())


if __name__ == "__main__":
    main()
