"""Soak the server: many requests from concurrent clients, mixing good completions and streamed
chats with clients that hang up mid-request and malformed requests (bad JSON, wrong types, lone
surrogates, oversized or bad Content-Length). Every good request must be answered (200), every
bad one refused with a 4xx, never a 5xx or a reset; afterwards no row is left running and the
server's memory is back near its baseline.

    python bench/soak_serve.py                       # 2,000 requests, 32 clients, tiny random model
    python bench/soak_serve.py --requests 500 --clients 8

tests/test_infer_server_soak.py runs :func:`soak` small, in process.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MALFORMED = [
    b"{not json",
    b'{"prompt": 5}',
    b'{"prompt": "\\ud800x", "max_tokens": 4}',
    b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
    b'{"messages": [{"role": "assistant", "content": "", "tool_calls": 5}]}',
    b'{"prompt": "x", "temperature": -1}',
    b'{"prompt": "x", "seed": 1180591620717411303424}',
    b"[]",
]


def _raw(host: str, port: int, payload: bytes, read: bool = True, timeout: float = 120) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        if not read:
            time.sleep(0.05)
            return b""  # hang up without reading the answer
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if out.startswith(b"HTTP/1.1") and (b"\r\n\r\n" in out) and b"[DONE]" in out:
                break
            if b"content-length:" in out.lower() and _complete(out):
                break
        return out


def _complete(out: bytes) -> bool:
    head, _, body = out.partition(b"\r\n\r\n")
    match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
    return bool(match) and len(body) >= int(match.group(1))


def _request(path: str, body: bytes, length: bytes | None = None) -> bytes:
    length = str(len(body)).encode() if length is None else length
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + length + b"\r\n\r\n" + body)


def one(url: str, i: int, rng: random.Random) -> str:
    """Send request ``i`` of the mix; return its outcome: good_ok, bad_4xx, gone, or a failure label."""
    host, port = url.removeprefix("http://").split(":")
    port = int(port)
    kind = rng.random()
    try:
        if kind < 0.6:
            body = json.dumps({"prompt": f"def f{i}(", "max_tokens": rng.randint(1, 24), "temperature": 0.8,
                               "seed": i}).encode()
            out = _raw(host, port, _request("/v1/completions", body))
            ok = out.startswith(b"HTTP/1.1 200") and b'"choices"' in out
            return "good_ok" if ok else f"good_failed:{out[:40]!r}"
        if kind < 0.75:
            body = json.dumps({"messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 12,
                               "stream": True}).encode()
            out = _raw(host, port, _request("/v1/chat/completions", body))
            ok = out.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in out
            return "good_ok" if ok else f"good_failed:{out[:40]!r}"
        if kind < 0.85:
            body = json.dumps({"prompt": "x", "max_tokens": 64, "stream": rng.random() < 0.5}).encode()
            _raw(host, port, _request("/v1/completions", body), read=False)
            return "gone"
        choice = rng.randrange(len(MALFORMED) + 2)
        if choice == len(MALFORMED):
            payload = _request("/v1/completions", b"", length=b"99999999")
        elif choice == len(MALFORMED) + 1:
            payload = _request("/v1/completions", b"{}", length=b"-1")
        else:
            payload = _request("/v1/chat/completions" if b"messages" in MALFORMED[choice] else "/v1/completions",
                               MALFORMED[choice])
        out = _raw(host, port, payload)
        status = out[9:12]
        return "bad_4xx" if status.startswith(b"4") else f"bad_got:{status!r}"
    except OSError as exc:
        return f"connection_error:{exc.__class__.__name__}"


def soak(url: str, requests: int, clients: int, seed: int = 0) -> Counter:
    rngs = [random.Random(seed * 100_003 + i) for i in range(requests)]
    with ThreadPoolExecutor(clients) as pool:
        return Counter(pool.map(lambda i: one(url, i, rngs[i]).split(":")[0], range(requests)))


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def health(url: str) -> dict:
    return json.load(urllib.request.urlopen(url + "/health", timeout=10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--checkpoint", default=None, help="default: a tiny random model")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from bench_serve import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(random_checkpoint("tiny", Path(tmp)))
        proc = subprocess.Popen([sys.executable, "-m", "codefoundry.cli", "serve", "--checkpoint", checkpoint,
                                 "--port", "0", "--device", "cpu", "--max-batch", "16", "--max-tokens", "64"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root)
        try:
            url = re.search(r"(http://[\d.:]+)/v1", proc.stdout.readline()).group(1)
            soak(url, 64, 8, seed=99)  # warm-up: every kind of request once or more
            base = rss_mb(proc.pid)
            start = time.perf_counter()
            counts = soak(url, args.requests, args.clients)
            wall = time.perf_counter() - start
            time.sleep(1.0)
            after = rss_mb(proc.pid)
            state = health(url)
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{args.requests} requests from {args.clients} clients in {wall:.1f} s: {dict(counts)}")
    print(f"server alive: {alive}, after: {state}; RSS {base:.0f} MB after warm-up -> {after:.0f} MB after the soak")
    failures = {k: v for k, v in counts.items() if k not in ("good_ok", "bad_4xx", "gone")}
    print("PASS" if alive and not failures and state["active_rows"] == 0 else f"FAIL {failures}")


if __name__ == "__main__":
    main()
