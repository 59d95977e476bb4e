"""Helpers of the service tests (tests/serve): the key, test images, a live uvicorn server."""

from __future__ import annotations

import io
import threading
import time

import numpy as np

KEY = "test-key-123"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
           "white": (250, 250, 250), "black": (10, 10, 10), "purple": (150, 40, 170), "orange": (250, 140, 20)}


def png(colour=(200, 30, 30), size=(40, 40)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, colour)
    ImageDraw.Draw(img).ellipse([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class LiveServer:
    def __init__(self, url, app, server, thread):
        self.url, self.app, self.server, self.thread = url, app, server, thread

    @property
    def service(self):
        return self.app.state.service


def start_server(app) -> LiveServer:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; returns once it answers."""
    from cliplab.serve import bind, run

    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    box: list = []
    thread = threading.Thread(target=run, args=(app,), kwargs=dict(sock=sock, log_level="warning", server_box=box),
                              daemon=True, name="cliplab-test-server")
    thread.start()
    for _ in range(200):  # at most 20 s
        if box and box[0].started:
            break
        if not thread.is_alive():
            raise RuntimeError("the test server stopped while starting")
        time.sleep(0.1)
    else:
        raise RuntimeError("the test server did not start within 20 s")
    import httpx

    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    return LiveServer(url, app, box[0], thread)


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=30)
    assert not live.thread.is_alive(), "the test server did not stop"


def brute_force(index_feats: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k rows of ``index_feats`` most similar to ``query`` (D,)."""
    return np.argsort(-(index_feats @ query), kind="stable")[:k]
