"""Load test of ``cliplab serve`` on loopback: latency, throughput, errors, micro-batching on vs off.

The service runs as the real command (``cliplab serve --no-auth --port 0``, the bundled
shapes-tiny model unless ``--model``) in its own process; ``--clients`` client threads of
this process (default 16), each with one keep-alive connection, send a fixed number of
requests in all (``--requests``, split evenly), each one text (``POST /v1/embed/text``) or
one 64x64 PNG (``POST /v1/embed/image``), as fast as answers come back.  Reported per run:
p50 / p99 latency, throughput (requests per second of wall time), errors (any status but
200, or a failed connection) and the service's own count of model calls per batch size
(``GET /v1/stats``).

Each endpoint is measured with micro-batching on (``--max-batch 32 --max-wait-ms 5``, the
defaults) and off (``--max-batch 1``: one request per model call), alternating, ``--rounds``
times; the speed-up is taken within each round, median over rounds.  A warm-up of 64
requests precedes every run.

``--arch ViT-B-32`` serves a model of that architecture with random weights instead: how
much batching gains depends on how much of a request the forward pass is, small for the
64-pixel shapes-tiny, large for a ViT-B-32.

Usage: python benchmarks/serve.py [--requests 2000] [--clients 16] [--rounds 3] [--device cpu]
       [--endpoints text,image] [--model SPEC | --arch ARCH]
Writes benchmarks/results/serve.json (or --out) and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "heart", "diamond"]
CONFIGS = {"batching on": ["--max-batch", "32", "--max-wait-ms", "5"], "batching off": ["--max-batch", "1"]}


def texts(n: int) -> list[str]:
    """Distinct captions of varied length, as a search box would send."""
    return [f"a photo of {1 + i % 3} {COLOURS[i % 8]} {SHAPES[(i // 8) % 8]}s" + " on a striped background" * (i % 2)
            for i in range(n)]


def images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), COLOURS[(i + 3) % 8])
        ImageDraw.Draw(img).ellipse([8 + i % 16, 8, 40 + i % 16, 40], fill=COLOURS[i % 8])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Server:
    """``cliplab serve`` in a subprocess; the URL read from its first line on stderr."""

    def __init__(self, extra: list[str], model: str, device: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               "CLIPLAB_PROGRESS": "0"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cliplab.cli.main", "serve", "--no-auth", "--port", "0",
                                      "--model", model, "--device", device, *extra],
                                     stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"cliplab serve did not start: {line}{self.proc.stderr.read()}")
        self.url = found.group(0)
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()   # keep the pipe drained

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "cliplab-bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load(url: str, endpoint: str, n_requests: int, clients: int) -> dict:
    """``n_requests`` requests from ``clients`` threads; latencies, wall time, errors.

    The clients use ``http.client`` with one keep-alive connection each: the lightest
    client the standard library has, so that the clients, on the same machine, take as
    little of its CPU as they can from the service.
    """
    host, port = url.removeprefix("http://").split(":")
    if endpoint == "text":
        bodies = [(json.dumps({"texts": [t]}).encode(), "application/json") for t in texts(n_requests)]
        path = "/v1/embed/text"
    else:
        bodies = [_multipart(b) for b in images(64)]
        path = "/v1/embed/image"
    per = [list(range(c, n_requests, clients)) for c in range(clients)]
    latencies = np.zeros(n_requests)
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(ids: list[int]) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        start.wait()
        for i in ids:
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    errors.append(f"{r.status}: {data[:100]!r}")
                elif i % 97 == 0 and not json.loads(data).get("dim"):
                    errors.append(f"no embedding in {data[:100]!r}")
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
            latencies[i] = time.perf_counter() - t0
        conn.close()

    threads = [threading.Thread(target=client, args=(ids,)) for ids in per]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": n_requests, "clients": clients, "errors": len(errors), "first_errors": errors[:5],
            "wall_s": wall, "throughput_rps": n_requests / wall,
            "latency_ms": {"p50": float(np.percentile(latencies, 50) * 1e3),
                           "p99": float(np.percentile(latencies, 99) * 1e3),
                           "mean": float(latencies.mean() * 1e3)}}


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/stats", timeout=60) as r:
        return json.loads(r.read())


def run_config(name: str, endpoint: str, args) -> dict:
    server = Server(CONFIGS[name], args.model, args.device)
    try:
        load(server.url, endpoint, 64, args.clients)                            # warm-up
        before = _stats(server.url)[endpoint]
        res = load(server.url, endpoint, args.requests, args.clients)
        after = _stats(server.url)[endpoint]
    finally:
        server.stop()
    sizes = {b: n - int(before["sizes"].get(b, 0)) for b, n in after["sizes"].items()}
    sizes = {b: n for b, n in sizes.items() if n}
    calls = sum(sizes.values())
    res["model_calls"] = calls
    res["mean_batch"] = sum(int(b) * n for b, n in sizes.items()) / calls if calls else 0.0
    res["batch_sizes"] = dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))
    return res


def random_model(arch: str, out: Path) -> Path:
    """An open_clip folder of architecture ``arch`` with random weights (speed does not
    depend on the weights; nothing is downloaded)."""
    import open_clip
    import torch

    from cliplab.models.convert import save_open_clip_folder
    from cliplab.models.loading import build_model

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise SystemExit(f"unknown open_clip architecture {arch!r}")
    torch.manual_seed(0)
    return save_open_clip_folder(out, cfg, build_model(cfg).state_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per run (default 2000)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent client threads (default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of on/off per endpoint (default 3)")
    ap.add_argument("--endpoints", default="text,image", help="comma-separated: text, image (default both)")
    ap.add_argument("--model", default="shapes-tiny", help="model spec (default: the bundled shapes-tiny)")
    ap.add_argument("--arch", help="instead of --model: an open_clip architecture with random weights (e.g. ViT-B-32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = ap.parse_args()
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not endpoints or set(endpoints) - {"text", "image"}:
        ap.error("--endpoints takes text and/or image")
    tmp = tempfile.TemporaryDirectory()
    if args.arch:
        args.model = str(random_model(args.arch, Path(tmp.name) / args.arch))
    runs: dict = {}
    for endpoint in endpoints:
        runs[endpoint] = {name: [] for name in CONFIGS}
        for r in range(args.rounds):
            for name in (list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]):  # alternate the order
                res = run_config(name, endpoint, args)
                runs[endpoint][name].append(res)
                print(f"{endpoint} {name} round {r + 1}: {res['throughput_rps']:.0f} req/s, p50 "
                      f"{res['latency_ms']['p50']:.1f} ms, p99 {res['latency_ms']['p99']:.1f} ms, "
                      f"{res['errors']} errors, mean batch {res['mean_batch']:.1f}", file=sys.stderr)
    summary = {}
    for endpoint, by in runs.items():
        speedups = [on["throughput_rps"] / off["throughput_rps"]
                    for on, off in zip(by["batching on"], by["batching off"])]
        summary[endpoint] = {
            "speedup_median": statistics.median(speedups), "speedups": speedups,
            **{name: {"throughput_rps": statistics.median(r["throughput_rps"] for r in rs),
                      "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in rs),
                      "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in rs),
                      "mean_batch": statistics.median(r["mean_batch"] for r in rs),
                      "errors": sum(r["errors"] for r in rs)} for name, rs in by.items()}}
    result = {
        "what": "cliplab serve on 127.0.0.1, one request = one text or one 64x64 PNG; clients in another process",
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        "configs": {k: " ".join(v) for k, v in CONFIGS.items()},
        "model": f"{args.arch} (random weights)" if args.arch else args.model, "device": args.device, "requests": args.requests, "clients": args.clients,
        "rounds": args.rounds, "summary": summary, "runs": runs,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_end": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    line = "; ".join(
        f"{e}: on {s['batching on']['throughput_rps']:.0f} req/s (p50 {s['batching on']['p50_ms']:.1f} ms, p99 "
        f"{s['batching on']['p99_ms']:.1f} ms), off {s['batching off']['throughput_rps']:.0f} req/s, "
        f"{s['speedup_median']:.2f}x, errors {s['batching on']['errors'] + s['batching off']['errors']}"
        for e, s in summary.items())
    print(f"serve ({args.clients} clients, {args.requests} requests): {line}")


if __name__ == "__main__":
    main()
