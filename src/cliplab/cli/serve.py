"""``cliplab serve``: the HTTP service and its web page (embed, classify, search)."""

from __future__ import annotations

import sys

from ..errors import UsageError
from ._common import add_model_args

HELP = "serve embedding, zero-shot classification and search over HTTP, with a web page"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help=HELP,
                       description="Start the HTTP service (FastAPI + uvicorn). Open http://HOST:PORT/ for "
                                   "the search page; the OpenAPI schema is at /openapi.json. Needs "
                                   "pip install 'cliplab[serve]'.")
    p.add_argument("--index", metavar="IDX", help="search index made by 'cliplab index build' with the same model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    auth = p.add_argument_group("authentication")
    auth.add_argument("--api-key", help="key clients send in the X-API-Key header (default: $CLIPLAB_API_KEY)")
    auth.add_argument("--no-auth", action="store_true",
                      help="serve without a key; only allowed on a loopback --host")
    lim = p.add_argument_group("batching and limits")
    lim.add_argument("--max-batch", type=int, default=32,
                     help="most concurrent requests per model call; 1 turns micro-batching off (default: 32)")
    lim.add_argument("--max-wait-ms", type=float, default=5.0,
                     help="longest a request waits for others to share its model call (default: 5)")
    lim.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body in MB (default: 10)")
    lim.add_argument("--max-pixels", type=int, default=None,
                     help="largest uploaded image in pixels; 0 = no limit "
                          "(default: CLIPLAB_MAX_PIXELS or about 179 million)")
    lim.add_argument("--max-labels", type=int, default=100, help="most labels per classification (default: 100)")
    lim.add_argument("--timeout", type=float, default=30.0,
                     help="seconds a request waits for the model before a 503 (default: 30)")
    p.add_argument("--templates", default="default",
                   help="prompt templates of /v1/classify: default, openai-7, openai-80, a file or a string with {c}")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.images import DEFAULT_MAX_PIXELS
    from ..validation import check_number

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"cliplab serve needs {e.name}: pip install 'cliplab[serve]'") from None
    from ..serve import ServeSettings, bind, check_auth, create_app, run as serve_app
    from ._common import load_backbone

    key = check_auth(args.host, args.api_key, args.no_auth)
    check_number("--max-body-mb", args.max_body_mb, minimum=0, strict_minimum=True)
    check_number("--timeout", args.timeout, minimum=0, strict_minimum=True)
    settings = ServeSettings(api_key=key, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_body_bytes=int(args.max_body_mb * 2**20),
                             max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None),
                             max_labels=args.max_labels, timeout_s=args.timeout, templates=args.templates)
    sock = bind(args.host, args.port)   # before loading: a taken port fails at once
    try:
        backbone = load_backbone(args)
        if args.index:
            from ..index import SearchIndex

            index = SearchIndex.load(args.index)
        else:
            index = None
        app = create_app(backbone, index=index, settings=settings)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {backbone.name} on http://{shown}:{port}/ "
              f"({'API key required' if key else 'no authentication'}"
              f"{f', index of {len(index)} items' if index is not None else ''}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        serve_app(app, sock=sock, log_level="warning" if not args.verbose else "info")
    finally:
        sock.close()
    return 0
