#!/usr/bin/env python3
"""Load and fault test of polar serve: many concurrent clients for a bounded time, some of them misbehaving.

Against `polar serve` on stories260K (127.0.0.1, a free port), CLIENTS concurrent clients loop for SECONDS:
most send greedy streaming completions and check the streamed text against the expected one (computed first,
one request at a time); some read a chunk or two and hang up; some send garbage (bytes that are not HTTP,
malformed JSON, a truncated body); some send whole (non-streaming) requests. Afterwards: every well-formed
request completed with the right text; the server's resident memory did not grow after the warm-up (the
first third of the run); /metrics reports no running request and an empty KV cache. Last, a graceful
shutdown under load: SIGTERM while streaming requests run, each still completes whole, and the server
exits 0. Prints the latency percentiles. Every socket operation has a timeout, so nothing can hang.

  load_test.py --polar BUILD/src/polar --model stories260K.gguf [--clients 256] [--seconds 120] [--shared DIR]

Uses only the standard library (asyncio streams speaking HTTP/1.1).
"""
import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

TIMEOUT = 60  # seconds any single request may take, even under full load
PROMPTS = ["Once upon a time", "Lily and Ben", "The little dog", "One day, a girl", "Tom had a big"]
LENGTHS = [8, 24, 48]


async def http(port, method, path, body=None, raw=None, read_chunks=None, on_status=None):
    """One request on its own connection. Returns (status, headers, body bytes); with read_chunks=k, hangs up
    after k chunks of the response body. raw: bytes to send instead of a well-formed request. on_status: called
    once the status line has arrived (the server has taken the request)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        if raw is None:
            data = json.dumps(body).encode() if body is not None else b""
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
            raw = head.encode() + data
        writer.write(raw)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), TIMEOUT)
        if not status_line:
            return None, {}, b""
        status = int(status_line.split()[1])
        if on_status:
            on_status()
        headers = {}
        while True:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        out = b""
        if headers.get("transfer-encoding") == "chunked":
            chunks = 0
            while True:
                size = int((await asyncio.wait_for(reader.readline(), TIMEOUT)).strip() or b"0", 16)
                if size == 0:
                    break
                out += await asyncio.wait_for(reader.readexactly(size + 2), TIMEOUT)
                out = out[:-2]
                chunks += 1
                if read_chunks is not None and chunks >= read_chunks:
                    return status, headers, out  # hang up mid-stream
        elif "content-length" in headers:
            out = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), TIMEOUT)
        else:
            out = await asyncio.wait_for(reader.read(), TIMEOUT)
        return status, headers, out
    finally:
        writer.close()


def sse_text(body):
    text, done = "", False
    for event in body.decode().split("\n\n"):
        if not event.startswith("data: "):
            continue
        payload = event[6:]
        if payload == "[DONE]":
            done = True
            continue
        for c in json.loads(payload)["choices"]:
            text += c["text"]
    return text, done


def request(prompt, n, stream):
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


class Stats:
    def __init__(self):
        self.ok = self.hung_up = self.garbage = self.whole = 0
        self.failures = []
        self.latency, self.ttft = [], []


async def client(port, expected, deadline, stats, rng):
    while time.time() < deadline:
        kind = rng.random()
        prompt, n = rng.choice(PROMPTS), rng.choice(LENGTHS)
        try:
            if kind < 0.75:  # a well-formed streaming request, checked
                t0 = time.time()
                status, _, body = await http(port, "POST", "/v1/completions", request(prompt, n, True))
                text, done = sse_text(body)
                if status != 200 or not done or text != expected[(prompt, n)]:
                    stats.failures.append(f"stream {prompt!r}/{n}: status {status}, done {done}, {text!r}")
                else:
                    stats.ok += 1
                    stats.latency.append(time.time() - t0)
            elif kind < 0.85:  # reads a little and hangs up
                await http(port, "POST", "/v1/completions", request(prompt, 200, True) | {"ignore_eos": True},
                           read_chunks=rng.choice([1, 2, 3]))
                stats.hung_up += 1
            elif kind < 0.93:  # garbage
                junk = rng.choice([
                    b"\x00\xff garbage \r\n\r\n",
                    b"POST /v1/completions HTTP/1.1\r\nContent-Length: 9\r\n\r\n{not json",
                    b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt\": \"trunc",
                    b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n",
                ])
                try:
                    writer_status, _, _ = await asyncio.wait_for(http(port, "POST", "/", raw=junk), 5)
                    if writer_status is not None and writer_status < 400:
                        stats.failures.append(f"garbage answered {writer_status}")
                except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                    pass  # dropped, or a truncated body the server waits on until we give up: both fine
                stats.garbage += 1
            else:  # whole
                status, _, body = await http(port, "POST", "/v1/completions", request(prompt, n, False))
                text = json.loads(body)["choices"][0]["text"] if status == 200 else None
                if text != expected[(prompt, n)]:
                    stats.failures.append(f"whole {prompt!r}/{n}: status {status}, {text!r}")
                stats.whole += 1
        except Exception as e:  # a well-formed request that broke
            if kind < 0.75 or kind >= 0.93:
                stats.failures.append(f"{type(e).__name__}: {e}")


async def run(args, port, pid):
    expected = {}
    for p in PROMPTS:
        for n in LENGTHS:
            status, _, body = await http(port, "POST", "/v1/completions", request(p, n, False))
            assert status == 200, body
            expected[(p, n)] = json.loads(body)["choices"][0]["text"]
    stats = Stats()
    start = time.time()
    deadline = start + args.seconds
    rss = []

    async def watch():
        while time.time() < deadline:
            rss.append((time.time() - start, rss_kib(pid)))
            await asyncio.sleep(2)

    rng = random.Random(1)
    await asyncio.gather(watch(), *[client(port, expected, deadline, stats, random.Random(rng.random()))
                                    for _ in range(args.clients)])
    return expected, stats, rss


async def drain_under_load(port, expected, proc):
    """SIGTERM once 64 streaming requests have been taken (their status lines arrived): each completes whole."""
    taken = asyncio.Event()
    count = [0]

    def one_taken():
        count[0] += 1
        if count[0] == 64:
            taken.set()

    tasks = [asyncio.create_task(http(port, "POST", "/v1/completions", request(PROMPTS[i % len(PROMPTS)], 48, True),
                                      on_status=one_taken))
             for i in range(64)]
    await asyncio.wait_for(taken.wait(), TIMEOUT)
    proc.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    bad = []
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            bad.append(f"{type(r).__name__}: {r}")
            continue
        status, _, body = r
        text, done = sse_text(body)
        if status != 200 or not done or text != expected[(PROMPTS[i % len(PROMPTS)], 48)]:
            bad.append(f"drain: status {status}, done {done}")
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--polar", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("POLAR_LOAD_SECONDS", 120)))
    ap.add_argument("--shared", help="the shared material (POLAR_SHARED overrides): a 'shared:REL' model is under it")
    args = ap.parse_args()
    if args.model.startswith("shared:"):
        args.model = os.path.join(os.environ.get("POLAR_SHARED") or args.shared or "", args.model[len("shared:"):])
    proc = subprocess.Popen([args.polar, "serve", "--model", args.model, "--port", "0", "--max-seqs", "64",
                             "--http-threads", str(args.clients + 64), "--drain-timeout", "60"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        while port is None:
            line = proc.stderr.readline()
            if not line:
                raise SystemExit("polar serve did not start")
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        for _ in range(600):
            try:
                if asyncio.run(http(port, "GET", "/health"))[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        expected, stats, rss = asyncio.run(run(args, port, proc.pid))
        _, _, metrics = asyncio.run(http(port, "GET", "/metrics"))
        metrics = metrics.decode()
        warm = [kib for t, kib in rss if t <= args.seconds / 3]
        later = [kib for t, kib in rss if t > args.seconds / 3]
        lat = sorted(stats.latency)
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
        print(f"{args.clients} clients for {args.seconds:g} s: {stats.ok} streamed requests checked, {stats.whole} whole, "
              f"{stats.hung_up} hung up mid-stream, {stats.garbage} garbage; latency p50 {q(0.5):.3f} s, "
              f"p99 {q(0.99):.3f} s; RSS {max(warm) / 1024:.1f} MiB after warm-up, {max(later) / 1024:.1f} MiB max later")
        failures = list(stats.failures)
        if stats.ok == 0:
            failures.append("no request completed")
        if later and max(later) > max(warm) * 1.05 + 16 * 1024:
            failures.append(f"resident memory grew after warm-up: {max(warm)} -> {max(later)} KiB")
        for name, want in [("polar_requests_running", 0), ("polar_requests_waiting", 0), ("polar_kv_cache_used_blocks", 0)]:
            if metric(metrics, name) != want:
                failures.append(f"/metrics: {name} is {metric(metrics, name)}, expected {want}")
        failures += asyncio.run(drain_under_load(port, expected, proc))
        rc = proc.wait(timeout=90)
        if rc != 0:
            failures.append(f"polar serve exited {rc} after SIGTERM under load")
        print(f"graceful shutdown under load: exit {rc}")
    except BaseException:
        proc.kill()
        raise
    if failures:
        print(f"{len(failures)} failures, first ones:\n  " + "\n  ".join(failures[:20]))
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
