"""`singularity-ds download`: a URL list served by a real HTTP server on 127.0.0.1 (started here, with
injected faults) into tar shards, each URL's status, the safety rules, crash-isolated decoding, resume
after SIGKILL, and training from the result."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from singularity_ds.cli import main
from singularity_ds.data.download import download
from singularity_ds.data.download.decode import DecodePool, Job
from singularity_ds.data.download.report import read_report
from singularity_ds.data.download.urllist import read_url_list
from singularity_ds.data.shards import read_shard, shard_list
from singularity_ds.data.synthetic import plan_clips, render, write_clip
from singularity_ds.errors import AnnotationError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FaultServer:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 under paths that choose the behaviour:
    /ok/NAME, /flaky/NAME (500 the first time, then the file), /down/NAME (503 always), /missing/NAME
    (404), /stall/NAME (headers never come), /truncated/NAME (half the body, full Content-Length),
    /html/NAME (an HTML page served as video/mp4), /redirect/NAME (302 to /ok/NAME?moved), /tofile/NAME
    (302 to a file: URL). ``requests`` counts the requests per path."""

    def __init__(self, files, delay=0.0, stall=5.0):
        self.files, self.delay, self.stall = files, delay, stall
        self.requests, self.lock, self.stop = Counter(), threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.requests[self.path] += 1
                    seen = server.requests[self.path]
                kind, _, name = self.path.lstrip("/").split("?")[0].partition("/")  # ?N: one path per case
                data = server.files.get(name)
                if kind in ("ok", "flaky", "truncated") and data is None or kind == "missing":
                    return self.send_error(404)
                if kind == "flaky" and seen == 1 or kind == "down":
                    return self.send_error(500 if kind == "flaky" else 503)
                if kind == "stall":
                    server.stop.wait(server.stall)  # longer than the client's timeout; ends with the test
                    return
                if kind in ("redirect", "tofile"):
                    self.send_response(302)
                    self.send_header("Location", f"/ok/{name}?moved" if kind == "redirect" else "file:///etc/hostname")
                    self.end_headers()
                    return
                if kind == "html":
                    data = b"<html><body>This video is no longer available</body></html>" * 20
                if server.delay:
                    server.stop.wait(server.delay)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg" if name.endswith(".jpg") else "video/mp4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if kind == "truncated" else data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def clip_files(corpus, n):
    """n synthetic clips (1 s each), a 20 s clip (long.mp4) and a 0.25 s one (short.mp4)."""
    videos = sorted(os.listdir(corpus / "videos"))[:n]
    files = {v: (corpus / "videos" / v).read_bytes() for v in videos}
    return files, videos


def add_odd_clips(files, tmp_path):
    clip = plan_clips(18, 3)[0]
    for name, frames in (("long.mp4", 160), ("short.mp4", 2)):
        write_clip(str(tmp_path / name), render(clip, 32, frames), 8)
        files[name] = (tmp_path / name).read_bytes()


def write_csv(path, rows):
    """WebVid's header: contentUrl,name,videoid."""
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i, (url, caption) in enumerate(rows):
            w.writerow([f"vid{i}", url, "PT00H00M01S", "dir", caption])


def shard_samples(index):
    """{row: sample} over every shard of an index (and each shard's name once)."""
    samples, names = {}, []
    for url, count in shard_list(index):
        names.append(os.path.basename(url))
        got = list(read_shard(url))
        assert len(got) == count
        for s in got:
            assert int(s["__key__"]) not in samples  # no sample twice
            samples[int(s["__key__"])] = s
    assert len(names) == len(set(names))
    return samples


# ------------------------------------------------------------------------ fast, in-process

def test_every_url_ends_in_its_status_and_good_clips_become_shards(corpus, tmp_path):
    files, videos = clip_files(corpus, 5)
    add_odd_clips(files, tmp_path)
    files["big.mp4"] = os.urandom(300_000)
    with FaultServer(files) as srv:
        u = srv.url
        cases = [  # (url, caption, expected status, expected requests)
            (f"{u}/ok/{videos[0]}", "a red square", "ok", 1),
            (f"{u}/ok/{videos[1]}", "a blue circle", "ok", 1),
            (f"{u}/missing/{videos[2]}", "gone", "http_404", 1),            # never retried
            (f"{u}/flaky/{videos[2]}", "a flaky host", "ok", 2),            # 500, retried, then ok
            (f"{u}/down/{videos[3]}", "a down host", "http_5xx", 2),        # 503, retried once
            (f"{u}/stall/{videos[3]}", "a stalled host", "timeout", 2),
            (f"{u}/truncated/{videos[3]}", "cut short", "truncated", 2),
            (f"{u}/html/{videos[3]}", "a dead link's page", "not_media", 1),
            (f"{u}/ok/long.mp4", "ten times too long", "too_long", 1),
            (f"{u}/ok/short.mp4", "too short", "too_short", 1),
            (f"{u}/redirect/{videos[4]}", "moved", "ok", 1),
            (f"{u}/tofile/{videos[4]}", "a redirect to a local file", "bad_scheme", 1),
            (f"{u}/ok/big.mp4", "over the size cap", "too_large", 1),
            (f"ftp://127.0.0.1/{videos[0]}", "ftp", "bad_scheme", 0),
            ("file:///etc/hostname", "a local file", "bad_scheme", 0),
            (f"{u}/ok/{videos[0]}?again", "", "no_caption", 0),
        ]
        write_csv(tmp_path / "list.csv", [(url, cap) for url, cap, _, _ in cases])
        out = tmp_path / "out"
        res = download(str(tmp_path / "list.csv"), str(out), size=32, fps=Fraction(2), workers=4,
                       decoders=2, timeout=1, retries=1, retry_wait=0.05, urls_per_chunk=6,
                       max_size="200KB", min_duration=0.5, max_duration=2, progress=False)
        requests = Counter(srv.requests)
    report = sorted(read_report(out / "report.parquet"), key=lambda r: r["row"])
    assert [r["status"] for r in report] == [c[2] for c in cases], [(r["status"], r["error"]) for r in report]
    for url, _, _, n in cases:  # 404 never retried, 5xx/timeouts/short bodies once; no_caption never fetched
        assert requests[url[len(u):]] == n if url.startswith(u) else n == 0, url
    expected = Counter(c[2] for c in cases)
    assert res["counts"] == dict(expected) and res["urls"] == len(cases)
    # the table printed at the end has the same counts
    assert f"{'timeout':<18}{1:>10}" in res["table"] and f"{'ok':<18}{4:>10}" in res["table"]
    assert report[5]["error"] == "no data for 1 s" and report[3]["attempts"] == 2
    # shards: exactly the good clips, re-encoded (2 fps, shorter side 32), captions from the list
    index = json.load(open(out / "index.json"))
    assert index["media_type"] == "video" and index["samples"] == 4 and index["failed"] == len(cases) - 4
    samples = shard_samples(out / "index.json")
    ok_rows = [i for i, c in enumerate(cases) if c[2] == "ok"]
    assert sorted(samples) == ok_rows
    for row in ok_rows:
        meta = json.loads(samples[row]["json"])
        assert meta == {"video": f"vid{row}.mp4", "caption": cases[row][1], "url": cases[row][0]}
        assert report[row]["shard"] == os.path.basename(samples[row]["__url__"])
        path = tmp_path / f"{row}.mp4"
        path.write_bytes(samples[row]["mp4"])
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            assert (s.codec_context.width, s.codec_context.height, s.average_rate) == (32, 32, 2)
            assert s.frames == 2  # 1 s at 2 fps
    # chunks of 6 URLs: 3 status files, shards named by chunk
    assert sorted(os.listdir(out / "status")) == [f"chunk-{c:06d}.json" for c in range(3)]
    assert not (out / ".partial").exists()


def test_cc3m_tsv_without_header_images(corpus, tmp_path):
    images = sorted(os.listdir(corpus / "images"))[:3]
    files = {n: (corpus / "images" / n).read_bytes() for n in images}
    files["cut.jpg"] = files[images[0]][:len(files[images[0]]) * 9 // 10]  # served whole: a truncated JPEG
    with FaultServer(files) as srv:
        rows = [(f"a picture {i}", f"{srv.url}/ok/{n}", "ok") for i, n in enumerate(images)]
        rows += [("a dead link", f"{srv.url}/html/{images[0]}", "not_media"),
                 ("a missing one", f"{srv.url}/missing/x.jpg", "http_404"),
                 ("a broken jpeg", f"{srv.url}/ok/cut.jpg", "decode_error"),
                 ("a local mirror", (corpus / "images" / images[1]).as_uri(), "ok")]  # --allow-file-urls
        (tmp_path / "cc3m.tsv").write_text("".join(f"{c}\t{u}\n" for c, u, _ in rows))
        out = tmp_path / "out"
        assert main(["download", str(tmp_path / "cc3m.tsv"), str(out), "--media-type", "image",
                     "--size", "24", "--decoders", "1", "--no-progress", "--retries", "0",
                     "--allow-file-urls"]) == 0
    report = sorted(read_report(out / "report.parquet"), key=lambda r: r["row"])
    assert [r["status"] for r in report] == [s for _, _, s in rows], report
    samples = shard_samples(out)
    assert sorted(samples) == [0, 1, 2, 6]
    for row, s in samples.items():
        assert json.loads(s["json"]) == {"image": f"{row}.jpg", "caption": rows[row][0], "url": rows[row][1]}
        path = tmp_path / "x.jpg"
        path.write_bytes(s["jpg"])
        with Image.open(path) as img:
            assert img.format == "JPEG" and min(img.size) == 24
    assert json.load(open(out / "index.json"))["media_type"] == "image"


def test_url_lists_in_every_format_and_column_errors(tmp_path):
    want = [(0, "http://h/a.mp4", "cap a", "a"), (1, "http://h/b.mp4", "cap b", "b")]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"url": u, "caption": c, "key": k}) + "\n"
                                              for _, u, c, k in want))
    pq.write_table(pa.table({"URL": [w[1] for w in want], "TEXT": [w[2] for w in want],
                             "key": [w[3] for w in want]}), tmp_path / "l.parquet")
    (tmp_path / "l.csv").write_text("link,words,ident\n" + "".join(f"{u},{c},{k}\n" for _, u, c, k in want))
    (tmp_path / "l.tsv").write_text("".join(f"{k}\t{c}\t{u}\n" for _, u, c, k in want))
    for name, cols in (("l.jsonl", {}), ("l.parquet", {}),
                       ("l.csv", dict(caption_col="words", id_col="ident")),
                       ("l.tsv", dict(caption_col="1", id_col="0"))):
        assert [tuple(r) for r in read_url_list(str(tmp_path / name), **cols)] == want, name
    # headerless, default columns: the URL column found, the caption is the first other one
    assert [r.caption for r in read_url_list(str(tmp_path / "l.tsv"))] == ["a", "b"]
    with pytest.raises(AnnotationError, match=r"l.csv: no column 'nope' for the caption \(columns: link, "
                                              r"words, ident\)"):
        list(read_url_list(str(tmp_path / "l.csv"), caption_col="nope"))
    with pytest.raises(AnnotationError, match=r"l.csv: no caption column .*name it with --caption-col"):
        list(read_url_list(str(tmp_path / "l.csv")))
    (tmp_path / "bad.tsv").write_bytes(b"caption\thttp://h/a.jpg\n\xff\xfe\tx\n")
    with pytest.raises(AnnotationError, match=r"bad.tsv: unreadable TSV \(UnicodeDecodeError: "):
        list(read_url_list(str(tmp_path / "bad.tsv")))
    (tmp_path / "l.txt").write_text("x")
    with pytest.raises(AnnotationError, match=r"l.txt: unknown URL list format '.txt'"):
        read_url_list(str(tmp_path / "l.txt"))
    # an empty list (a header only) is refused before anything is written
    (tmp_path / "empty.csv").write_text("url,caption\n")
    with pytest.raises(AnnotationError, match=r"empty.csv: no URL rows \(an empty list, or a header only\); "
                                              r"nothing to download"):
        download(str(tmp_path / "empty.csv"), str(tmp_path / "never"), progress=False)
    assert not (tmp_path / "never").exists()


def test_a_row_that_is_no_url_is_bad_url():
    from singularity_ds.data.download.fetch import Failure, check_scheme
    for text, status in (("not a url", "bad_url"), ("www.example.com/a.mp4", "bad_url"),
                         ("ftp://h/a.mp4", "bad_scheme"), ("http:///a.mp4", "bad_url")):
        with pytest.raises(Failure) as e:
            check_scheme(text, allow_file=False)
        assert e.value.status == status, (text, e.value.status)
    check_scheme("https://h/a.mp4", allow_file=False)  # a URL passes


def test_a_decoder_that_dies_or_hangs_fails_only_its_url(corpus, tmp_path):
    """A decoder process killed mid-job (as a crash in FFmpeg would) or running past the timeout is that
    URL's decode_error; the pool replaces it and the next file decodes."""
    src = str(sorted((corpus / "videos").iterdir())[0])
    job = Job("video", src, str(tmp_path / "o.mp4"), 32, Fraction(2), None, 0, 60)
    pool = DecodePool(1, timeout=60)
    try:
        first = pool.run(job)
        assert first.status == "ok" and first.duration == 1.0 and first.cpu > 0
        os.kill(pool.busy_pids()[0], signal.SIGKILL)
        res = pool.run(job._replace(dst=str(tmp_path / "p.mp4")))
        assert res == ("decode_error", "the decoder process died (signal 9)", None, None)
        assert pool.run(job._replace(dst=str(tmp_path / "q.mp4"))).status == "ok"
    finally:
        pool.close()
    pool = DecodePool(1, timeout=0.001)  # a hang, in miniature: the worker is killed
    try:
        res = pool.run(job)
        assert res.status == "decode_error" and res.error == "decoding took over 0.001 s (worker killed)"
    finally:
        pool.close()


def test_a_rerun_skips_finished_chunks_and_refuses_other_settings(corpus, tmp_path, capsys):
    files, videos = clip_files(corpus, 3)
    with FaultServer(files) as srv:
        write_csv(tmp_path / "list.csv", [(f"{srv.url}/ok/{v}", f"clip {v}") for v in videos])
        args = ["download", str(tmp_path / "list.csv"), str(tmp_path / "out"), "--size", "32", "--decoders",
                "1", "--no-progress", "--urls-per-chunk", "2"]
        assert main(args) == 0
        first = dict(srv.requests)
        assert sum(first.values()) == 3
        assert main(args) == 0  # nothing left to do: no request
        assert dict(srv.requests) == first
        assert "this run: 0 URLs" in capsys.readouterr().out
        assert main(args[:-1] + ["3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("singularity-ds: error: ") and "\n" not in err
    assert "a download with other settings is there (urls_per_chunk: 2 -> 3)" in err
    assert main(["download", str(tmp_path / "nope.csv"), str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err == f"singularity-ds: error: {tmp_path / 'nope.csv'}: URL list not found\n"


# ------------------------------------------------------------------------ slow: kill, resume, train

def _start_download(cmd, log):
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_killed_download_resumes_and_its_shards_train_on_two_ranks(corpus, tmp_path):
    """~50 URLs with every fault; the download's process group is SIGKILLed after two chunks, the rerun
    finishes without fetching those chunks again, and a 2-rank pretraining run streams the shards."""
    import random
    files, videos = clip_files(corpus, 30)
    add_odd_clips(files, tmp_path)
    faults = ([("missing", "http_404")] * 3 + [("flaky", "ok")] * 2 + [("stall", "timeout")] * 2
              + [("truncated", "truncated")] * 2 + [("html", "not_media")] * 2 + [("redirect", "ok")] * 3
              + [("down", "http_5xx"), ("tofile", "bad_scheme")])
    with FaultServer(files, delay=0.4) as srv:
        cases = [(f"{srv.url}/ok/{v}", "ok") for v in videos]
        cases += [(f"{srv.url}/{kind}/{videos[i]}?{i}", status) for i, (kind, status) in enumerate(faults)]
        cases += [(f"{srv.url}/ok/long.mp4?{i}", "too_long") for i in range(2)]  # 10x the 2 s cap
        cases += [("ftp://127.0.0.1/a.mp4", "bad_scheme")]
        random.Random(0).shuffle(cases)
        assert len(cases) == 49
        write_csv(tmp_path / "list.csv", [(url, f"caption {i}") for i, (url, _) in enumerate(cases)])
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "singularity_ds", "download", str(tmp_path / "list.csv"), str(out),
               "--size", "32", "--workers", "4", "--decoders", "2", "--timeout", "1", "--retries", "1",
               "--retry-wait", "0.05", "--urls-per-chunk", "5", "--max-duration", "2", "--no-progress"]
        proc = _start_download(cmd, tmp_path / "log1")
        deadline = time.time() + 300
        while len(list((out / "status").glob("chunk-*.json"))) < 2:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log1").read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = dict(srv.requests)
        done = [json.load(open(p)) for p in sorted((out / "status").glob("chunk-*.json"))]
        assert 2 <= len(done) < 10 and not (out / "report.parquet").exists()
        kept = {s["url"]: os.stat(out / s["url"]) for c in done for s in c["shards"]}
        resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        after = dict(srv.requests)
    # the finished chunks were neither fetched nor written again
    for c in done:
        for r in c["results"]:
            path = r["url"][len(srv.url):]
            assert after.get(path, 0) == before.get(path, 0), path
    for name, st in kept.items():
        assert (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    # every URL has its status; the counts are the injected faults
    report = sorted(read_report(out / "report.parquet"), key=lambda r: r["row"])
    assert [r["status"] for r in report] == [s for _, s in cases]
    assert Counter(r["status"] for r in report) == Counter(ok=35, http_404=3, timeout=2, truncated=2,
                                                           not_media=2, too_long=2, bad_scheme=2, http_5xx=1)
    assert f"{'ok':<18}{35:>10}" in resumed.stdout
    # shards: each listed once, none missing, none extra, every good URL in exactly one
    index = json.load(open(out / "index.json"))
    listed = [s["url"] for s in index["shards"]]
    assert sorted(listed) == sorted(p.name for p in out.glob("shard-*.tar"))
    assert len(set(listed)) == len(listed)
    assert sorted(shard_samples(out / "index.json")) == [i for i, (_, s) in enumerate(cases) if s == "ok"]
    # a real 2-rank pretraining run streams them (train_corpus names the index)
    (tmp_path / "dl.yaml").write_text(f"available_corpus:\n  downloaded: [['{out / 'index.json'}', null, "
                                      f"video]]\ntrain_corpus: downloaded\n")
    run_dir = tmp_path / "run"
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    from singularity_ds.dist import free_port
    train = subprocess.run(
        [launcher, "--num_accelerators", "2", "--master_port", str(free_port()), "--module", "singularity_ds",
         "train", "pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"), str(tmp_path / "dl.yaml"),
         "image_res=32", "batch_size.video=4", "num_workers=0", "log_freq=1", "max_steps=2",
         f"output_dir={run_dir}"],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    history = json.load(open(run_dir / "history.json"))
    assert len(history) == 2 and all(h["loss"] == h["loss"] for h in history)  # 2 steps, finite losses
    assert "downloaded" in (run_dir / "config.yaml").read_text()
