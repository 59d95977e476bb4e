"""Fixtures of the service tests: a small indexed image folder, the app, and a live server.

The live server is uvicorn in a thread of the test process, on a free port of 127.0.0.1
(bound by the tests, port 0), stopped at the end of the module that started it.
"""

from __future__ import annotations

import pytest

from _serve import COLOURS, KEY, png, start_server, stop_server


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Eight small PNGs, one colour each."""
    root = tmp_path_factory.mktemp("serve-images")
    for name, colour in COLOURS.items():
        (root / f"{name}.png").write_bytes(png(colour))
    return root


@pytest.fixture(scope="session")
def index_dir(tiny, image_folder, tmp_path_factory):
    """A SearchIndex of the folder, built with the tiny model."""
    from cliplab.index import SearchIndex

    paths = sorted(str(p) for p in image_folder.glob("*.png"))
    feats = tiny.encode_images(paths).features                                    # (8, D)
    out = tmp_path_factory.mktemp("serve-index") / "idx"
    SearchIndex.build(feats, paths, out, model=tiny.name, fingerprint=tiny.fingerprint)
    return out


@pytest.fixture(scope="module")
def live(tiny, index_dir):
    """A live service with the tiny model, the index and the key :data:`KEY`; a 50 ms batching
    window, so that concurrent requests share model calls."""
    from cliplab.serve import ServeSettings, create_app

    app = create_app(tiny, index=index_dir, settings=ServeSettings(api_key=KEY, max_wait_ms=50, timeout_s=60))
    server = start_server(app)
    yield server
    stop_server(server)
