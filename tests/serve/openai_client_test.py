#!/usr/bin/env python3
"""polar serve against a client nobody here wrote: the official `openai` Python package.

Starts `polar serve` on 127.0.0.1 (a free port, an API key), then: completions whole and streamed (greedy)
equal each other and `polar generate`; echo with logprobs and max_tokens 0 (lm-evaluation-harness's
log-likelihood request) gives the log-softmax of `polar logits` over the same tokens; chat completions whole and streamed equal each other (with the
model's own template, or --chat-template); models.list; the client's typed errors for a bad parameter and a
wrong key; SIGTERM exits 0. Bounded: every request has a timeout and the server is killed on any failure.

  openai_client_test.py --polar BUILD/src/polar --model MODEL [--chat-template FILE] [--venv DIR] [--shared DIR]

Exits 77 (ctest: skipped) when the model file is absent or no Python with `openai` is found (scripts/test.sh
installs it into build/venv, so CI always runs this).
"""
import argparse
import array
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SKIP = 77


def find_openai(venv):
    try:
        import openai  # noqa: F401
        return
    except ImportError:
        pass
    python = os.path.join(venv, "bin", "python") if venv else ""
    if python and os.path.exists(python) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        os.execv(python, [python] + sys.argv)
    print("openai is not installed (scripts/test.sh installs it into build/venv): skipped")
    sys.exit(SKIP)


def start_server(polar, model, extra):
    proc = subprocess.Popen([polar, "serve", "--model", model, "--port", "0", "--api-key", "test-key",
                             "--max-seqs", "8"] + extra, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    port = None
    while port is None:
        line = proc.stderr.readline()
        if not line or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"polar serve did not start: {line!r}")
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
    # Keep reading its log, so that a full pipe never blocks it.
    threading.Thread(target=lambda: [sys.stderr.write(l) for l in proc.stderr], daemon=True).start()
    while True:  # /health: 503 while loading, 200 once serving
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("polar serve never became healthy")
        time.sleep(0.1)
    return proc, port


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def log_softmax_rows(polar, model, ids, tmp):
    """The log-softmax of every row of `polar logits` over the token ids (row p scores token p + 1)."""
    path = os.path.join(tmp, "logits.safetensors")
    subprocess.run([polar, "logits", "--model", model, "--tokens", ",".join(map(str, ids)), "--out", path],
                   capture_output=True, text=True, timeout=300, check=True)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_len))["logits"]
        begin, end = entry["data_offsets"]
        f.seek(8 + header_len + begin)
        values = array.array("f")
        values.frombytes(f.read(end - begin))
    check(entry["dtype"] == "F32" and sys.byteorder == "little", f"logits {entry}")
    rows, vocab = entry["shape"]
    out = []
    for r in range(rows):
        row = values[r * vocab:(r + 1) * vocab]
        mx = max(row)
        lse = mx + math.log(sum(math.exp(x - mx) for x in row))
        out.append([x - lse for x in row])
    return out


def close(got, want, rel=1e-5):
    return abs(got - want) <= rel * max(1.0, abs(want))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--polar", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--chat-template")
    ap.add_argument("--venv")
    ap.add_argument("--shared", help="the shared material (POLAR_SHARED overrides): 'shared:REL' paths are under it")
    args = ap.parse_args()
    shared = os.environ.get("POLAR_SHARED") or args.shared or ""
    for name in ("model", "chat_template"):
        value = getattr(args, name)
        if value and value.startswith("shared:"):
            setattr(args, name, os.path.join(shared, value[len("shared:"):]))
    if not os.path.exists(args.model):
        print(f"{args.model} is absent (scripts/fetch-model.sh fetches the default model): skipped")
        return SKIP
    find_openai(args.venv)
    import openai

    extra = []
    tmp = tempfile.TemporaryDirectory()
    if args.chat_template:
        template = args.chat_template
        if template.endswith(".json"):  # a fixture of ../shared/fixtures/chat: its "template"
            template = os.path.join(tmp.name, "template.jinja")
            with open(template, "w") as f:
                f.write(json.load(open(args.chat_template))["template"])
        extra = ["--chat-template", template]
    proc, port = start_server(args.polar, args.model, extra)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test-key", timeout=120, max_retries=0)
        model = client.models.list().data[0].id
        prompt, n = "Once upon a time", 24

        whole = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
        text = whole.choices[0].text
        check(whole.usage.completion_tokens <= n and whole.usage.prompt_tokens > 0, f"usage {whole.usage}")
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True) if c.choices)
        check(streamed == text, f"streamed {streamed!r} != whole {text!r}")
        generated = subprocess.run([args.polar, "generate", "--model", args.model, "--prompt", prompt,
                                    "--max-tokens", str(n), "--temperature", "0"], capture_output=True, text=True,
                                   timeout=300, check=True).stdout
        check(generated == text + "\n", f"polar generate {generated!r} != served {text!r}")
        print(f"completions: {text!r} (whole = streamed = generate)")

        ids = [1, 403, 407, 261, 378]  # "Once upon a time" in stories260K; any ids in the vocabulary do
        scored = client.completions.create(model=model, prompt=ids, logprobs=2, echo=True, max_tokens=0)
        lp = scored.choices[0].logprobs
        ref = log_softmax_rows(args.polar, args.model, ids, tmp.name)
        check(len(lp.tokens) == len(ids) and len(lp.token_logprobs) == len(ids) and len(lp.text_offset) == len(ids),
              f"one entry per prompt token: {lp}")
        check(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "nothing scores the first token")
        check(lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), f"text_offset {lp.text_offset}")
        check(scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 0, f"usage {scored.usage}")
        for i in range(1, len(ids)):
            want = ref[i - 1][ids[i]]
            check(close(lp.token_logprobs[i], want), f"token {i}: {lp.token_logprobs[i]} != {want}")
            best = sorted(ref[i - 1], reverse=True)[:2]
            top = sorted(lp.top_logprobs[i].values(), reverse=True)
            check(2 <= len(top) <= 3 and all(close(g, w) for g, w in zip(top, best)) and
                  any(close(v, want) for v in top), f"token {i}: top_logprobs {lp.top_logprobs[i]}, want {best}")
        print(f"echo + logprobs: {sum(lp.token_logprobs[1:]):.4f} = polar logits' log-likelihood")

        if args.chat_template or "Instruct" in args.model:
            messages = [{"role": "user", "content": "Write one sentence about the sea."}]
            chat = client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0)
            reply = chat.choices[0].message.content
            check(chat.choices[0].message.role == "assistant", "role")
            parts = client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
            chunks = list(parts)
            check(chunks[0].choices[0].delta.role == "assistant", "the first chunk carries the role")
            check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens,
                  "include_usage")
            # The same prompt again: its whole 16-token blocks come from the prefix cache, and usage says so.
            details = chunks[-1].usage.prompt_tokens_details
            check(details is not None and details.cached_tokens == (chat.usage.prompt_tokens - 1) // 16 * 16,
                  f"cached prompt tokens of a repeated prompt of {chat.usage.prompt_tokens}: {details}")
            streamed = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
            check(streamed == reply, f"streamed chat {streamed!r} != whole {reply!r}")
            print(f"chat: {reply!r} (whole = streamed)")

        try:
            client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=5)
            raise AssertionError("temperature 5 was accepted")
        except openai.BadRequestError as e:
            check("temperature" in str(e), str(e))
        try:
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        try:
            client.completions.create(model="no-such-model", prompt=prompt)
            raise AssertionError("an unknown model was accepted")
        except openai.NotFoundError:
            pass
        print("errors: BadRequestError, AuthenticationError, NotFoundError")
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    check(rc == 0, f"polar serve exited {rc} on SIGTERM")
    print("SIGTERM: exit 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
