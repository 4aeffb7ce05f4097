"""``singularity-ds serve INDEX``: a search page over an index (FastAPI + uvicorn).

    GET /                 the page: a search box, result thumbnails with scores; a click plays the clip
    GET /api/search?q=... hits as JSON (k, rerank as in ``singularity-ds search``)
    GET /thumbs/NAME      a thumbnail made at embed time
    GET /media/PATH       an indexed media file

Bound to 127.0.0.1 unless ``--host`` says otherwise. ``/media`` serves only the index's own items, and
only when the file, symlinks resolved, lies inside the index's media root: ``..``, absolute paths,
URL-encoded variants and symlinks that leave the root are all a 404, as is any file not in the index.
Browsers play H.264 MP4 and VP8/VP9 WebM; other containers (AVI, MKV with other codecs) are sent as
they are, and the page says when the browser cannot play one (the thumbnail stays)."""
import argparse
import html
import logging
import os

from ..errors import ConfigError
from .index import Index

logger = logging.getLogger(__name__)

MEDIA_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska",
               ".mov": "video/quicktime", ".avi": "video/x-msvideo", ".gif": "image/gif",
               ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp"}

PAGE = os.path.join(os.path.dirname(__file__), "page.html")  # $TITLE, $COUNT, $RERANK filled in


def inside(root: str, path: str):
    """``path`` (relative to ``root``) as a real path, if it stays inside ``root`` once every symlink is
    resolved; else None."""
    if not path or os.path.isabs(path) or "\x00" in path:
        return None
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, path))
    return full if os.path.commonpath([full, real_root]) == real_root else None


def make_app(index: Index):
    import time

    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse
    app = FastAPI(title="singularity-ds search", docs_url=None, redoc_url=None, openapi_url=None)
    root = index.meta["media_root"]
    thumbs = os.path.join(index.path, "thumbs")
    known = set(index.by_path)
    with open(PAGE) as f:
        page = f.read()
    rerank = ('<label>re-rank top <input id="rerank" type="checkbox" value="32" checked> 32 with ITM</label> '
              if index.meta.get("tokens") else "")
    page = (page.replace("$TITLE", html.escape(os.path.basename(os.path.abspath(index.path))))
            .replace("$COUNT", str(len(index.items))).replace("$RERANK", rerank))

    @app.get("/", response_class=HTMLResponse)
    def home():
        return page

    @app.get("/api/search")
    def api_search(q: str = Query(..., min_length=1, max_length=500), k: int = Query(10, ge=1, le=100),
                   rerank: int = Query(0, ge=0, le=1000)):
        t0 = time.perf_counter()
        try:
            hits = index.search(q, k, rerank)
        except ConfigError as e:
            raise HTTPException(400, str(e)) from None
        for h in hits:
            if h.get("itm") != h.get("itm"):  # NaN (past the re-ranked ones) is not JSON
                del h["itm"]
        return dict(hits=hits, ms=(time.perf_counter() - t0) * 1e3)

    @app.get("/thumbs/{name}")
    def thumb(name: str):
        full = inside(thumbs, name)
        if full is None or not os.path.isfile(full):
            raise HTTPException(404, "no such thumbnail")
        return FileResponse(full, media_type="image/jpeg")

    @app.get("/media/{path:path}")
    def media(path: str):
        # only the index's items (paths as listed), and only inside the media root once resolved
        full = inside(root, path) if path in known else None
        if full is None or not os.path.isfile(full):
            raise HTTPException(404, "not an item of this index")
        ext = os.path.splitext(full)[1].lower()
        return FileResponse(full, media_type=MEDIA_TYPES.get(ext, "application/octet-stream"))

    return app


def serve_main(argv) -> int:
    p = argparse.ArgumentParser(prog="singularity-ds serve", description="A search page over an index.")
    p.add_argument("index")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default: this machine only)")
    args = p.parse_args(list(argv))
    import uvicorn
    index = Index.load(args.index)
    index.model  # load it now, not on the first query
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can search and watch the indexed "
                       "media", args.host)
    print(f"serving {args.index} ({len(index.items)} items) on http://{args.host}:{args.port}/")
    uvicorn.run(make_app(index), host=args.host, port=args.port, log_level="warning")
    return 0
