"""embed / search / serve on the synthetic corpus with the tiny (random-initialised) model: the index
against the evaluation's own scores, resumption, broken media, two ranks, the vector index, the web
page's file serving and the page itself in a real headless Chromium."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from singularity_ds.config import load_config
from singularity_ds.models import Singularity

FRAMES = 3


def _checkpoint(corpus, path):
    """The tiny model (random; ITM head scaled so its scores differ) as the original saves it."""
    from singularity_ds.models.weights import plain_config
    cfg = load_config(["ret_msrvtt", "tiny", str(corpus / "configs" / "ret.yaml")],
                      ["image_res=32", f"video_input.num_frames_test={FRAMES}"])
    torch.manual_seed(0)
    model = Singularity(cfg).eval()
    with torch.no_grad():
        model.itm_head.weight.mul_(20)
    torch.save({"model": model.state_dict(), "config": plain_config(cfg)}, path)
    return str(path)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """A checkpoint and an fp32 index with tokens over the corpus's video folder (36 clips)."""
    from singularity_ds.cli import main
    root = tmp_path_factory.mktemp("search")
    ckpt = _checkpoint(corpus, root / "tiny.pth")
    index = root / "index"
    assert main(["embed", ckpt, str(corpus / "videos"), str(index), "--frames", str(FRAMES), "--tokens",
                 "--dtype", "fp32", "--batch", "8", "--part-size", "16"]) == 0
    return dict(ckpt=ckpt, index=index, root=root)


def _eval_scores(corpus, ckpt, anno):
    """The evaluation's dense two-stage scores for ``anno`` over the corpus's videos, every pair scored."""
    from singularity_ds.data.annotations import load_corpus
    from singularity_ds.data.builders import media_source
    from singularity_ds.data.datasets import RetrievalEvalDataset
    from singularity_ds.data.text import build_tokenizer
    from singularity_ds.eval.retrieval import evaluate
    from singularity_ds.models import load_model
    model = load_model(ckpt, **{"video_input.num_frames_test": FRAMES})
    config = model.config
    config.vit_type = model.vit_type
    ds = RetrievalEvalDataset(load_corpus([(anno, str(corpus / "videos"), "video")]),
                              media_source(config, "video", train=False), has_multi_vision_gt=True)
    res = evaluate(model, ds, build_tokenizer(), 32, k_test=len(ds))
    return ds, res["scores"]


def test_search_scores_are_the_evaluations_two_stage_scores(corpus, built):
    from singularity_ds.search import Index
    index = Index.load(str(built["index"]))
    assert len(index.items) == 36 and index.embeddings.shape == (36, 64)
    assert index.embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-5)
    assert [it["path"] for it in index.items] == sorted(os.listdir(corpus / "videos"))
    assert all(it["frames"] == FRAMES and it["duration"] == 1.0 for it in index.items)  # 8 frames at 8 fps
    assert all((built["index"] / it["thumb"]).is_file() for it in index.items)
    meta = json.loads((built["index"] / "meta.json").read_text())
    assert meta["checkpoint"] == built["ckpt"] and len(meta["sha256"]) == 64
    assert meta["config"]["image_res"] == 32 and meta["frames"] == FRAMES
    ds, scores = _eval_scores(corpus, built["ckpt"], str(corpus / "anno" / "ret_test_motion.json"))
    for t in range(0, len(ds.text), 2):
        hits = index.search(ds.text[t], k=36, rerank=36)  # everything re-ranked: the final order is ITM's
        by_path = {h["path"]: h for h in hits}
        for m, path in enumerate(ds.media):
            hit = by_path[os.path.basename(path)]
            # stage 1: evaluation's ITC (mean of per-frame cosines) = cosine with the normalised mean x norm
            assert hit["itc"] == pytest.approx(float(scores["i2t_itc"][m, t]), abs=1e-5)
            assert hit["itm"] == pytest.approx(float(scores["t2i"][t, m]), abs=1e-4)  # stage 2, same pair
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # ITC only: the stored cosines, best first, and re-ranking only the first few keeps the rest in ITC order
    plain = index.search(ds.text[0], k=10)
    assert [h["itc"] for h in plain] == sorted((h["itc"] for h in plain), reverse=True)
    part = index.search(ds.text[0], k=10, rerank=4)
    assert {h["path"] for h in part[:4]} == {h["path"] for h in plain[:4]}
    assert [h["path"] for h in part[4:]] == [h["path"] for h in plain[4:]]


def test_like_finds_the_video_itself_and_cli_prints_json(corpus, built, capsys):
    from singularity_ds.cli import main
    from singularity_ds.search import Index
    index = Index.load(str(built["index"]))
    for it in index.items[::7]:
        assert index.like(it["path"], k=3)[0]["path"] == it["path"]
        # the same file given by its own path (encoded again, not looked up) finds itself too
        assert index.like(str(corpus / "videos" / it["path"]), k=1)[0]["path"] == it["path"]
    outside = built["root"] / "copy.mp4"  # not in the index: encoded now, nearest is the original
    shutil.copy(corpus / "videos" / "clip_00005.mp4", outside)
    hit = index.like(str(outside), k=1)[0]
    assert hit["path"] == "clip_00005.mp4" and hit["score"] == pytest.approx(1, abs=1e-5)
    assert main(["search", str(built["index"]), "--like", "clip_00003.mp4", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["path"] == "clip_00003.mp4"
    assert main(["search", str(built["index"]), "a square moves from left to right", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["#", "score", "itc", "itm"] and len(table) == 4


def test_search_bad_input_is_one_line(corpus, built, tmp_path, capsys):
    from singularity_ds.cli import main
    assert main(["search", str(tmp_path), "a dog"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a finished index" in err
    plain = tmp_path / "plain"  # no --tokens: no ITM re-ranking
    assert main(["embed", built["ckpt"], str(corpus / "images"), str(plain), "--frames", "1"]) == 0
    capsys.readouterr()
    assert main(["search", str(plain), "a dog", "--rerank", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without --tokens" in err
    for empty in ("", "   "):  # refused, as the page's API refuses an empty q
        assert main(["search", str(plain), empty]) == 2
        assert capsys.readouterr().err == ('singularity-ds: error: search: the query text is empty; give '
                                           'words to search for, e.g. singularity-ds search INDEX "a dog '
                                           'catches a frisbee"\n')
    assert main(["embed", built["ckpt"], str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_index_build_from_a_model_in_memory(corpus, built, tmp_path):
    """The Python API (what `make demo` calls): Index.build with a loaded model gives the CLI's embeddings
    and search; loaded again without the model, it says to pass one (it names no checkpoint)."""
    from singularity_ds.errors import CheckpointError
    from singularity_ds.models import load_model
    from singularity_ds.search import Index
    model = load_model(built["ckpt"], **{"video_input.num_frames_test": FRAMES})
    index = Index.build(model, str(corpus / "videos"), str(tmp_path / "idx"), frames=FRAMES, dtype="fp32",
                        batch_size=8)
    cli = Index.load(str(built["index"]))
    assert [it["path"] for it in index.items] == [it["path"] for it in cli.items]
    assert np.allclose(index.embeddings, cli.embeddings, atol=1e-5)
    assert [h["path"] for h in index.search("a red square", k=5)] == \
        [h["path"] for h in cli.search("a red square", k=5)]
    with pytest.raises(CheckpointError, match="from a model in memory.*Index.load\\(path, model=...\\)"):
        Index.load(str(tmp_path / "idx")).search("a red square")


def test_broken_media_are_listed_not_fatal(corpus, built, tmp_path):
    from singularity_ds.search import Index
    lib = tmp_path / "lib"
    (lib / "sub").mkdir(parents=True)
    for name in ("clip_00000.mp4", "clip_00001.mp4"):
        shutil.copy(corpus / "videos" / name, lib / "sub" / name)
    (lib / "empty.mp4").write_bytes(b"")
    (lib / "garbage.mp4").write_bytes(b"\x00not a video" * 50)
    shutil.copy(sorted((corpus / "images").iterdir())[0], lib / "photo.jpg")
    from singularity_ds.cli import main
    assert main(["embed", built["ckpt"], str(lib), str(tmp_path / "idx"), "--frames", str(FRAMES)]) == 0
    index = Index.load(str(tmp_path / "idx"))
    assert [it["path"] for it in index.items] == ["photo.jpg", "sub/clip_00000.mp4", "sub/clip_00001.mp4"]
    assert [it["media_type"] for it in index.items] == ["image", "video", "video"]
    assert index.embeddings.dtype == np.float16
    broken = {b["path"]: b["reason"] for b in index.broken}
    assert sorted(os.path.basename(p) for p in broken) == ["empty.mp4", "garbage.mp4"]
    assert "empty file" in broken[str(lib / "empty.mp4")]
    # the clips embed as in the big index (fp16 here)
    big = Index.load(str(built["index"]))
    assert np.allclose(index.embeddings[1].astype(np.float32), big.embeddings[big.by_path["clip_00000.mp4"]],
                       atol=2e-3)


def test_embed_reads_a_shard_corpus_in_place(corpus, built, tmp_path):
    """Each sample's media is read straight from its tar (no unpacking): the same embedding as the file."""
    import tarfile

    from singularity_ds.cli import main
    from singularity_ds.search import Index
    shards = corpus / "shards" / "video"
    assert main(["embed", built["ckpt"], str(shards / "index.json"), str(tmp_path / "idx"), "--frames",
                 str(FRAMES), "--dtype", "fp32"]) == 0
    index, files = Index.load(str(tmp_path / "idx")), Index.load(str(built["index"]))
    names = {}  # "shard-000000.tar#000000017" -> the clip the sample holds
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    names[f"{tar_path.name}#{m.name[:-5]}"] = json.load(tar.extractfile(m))["video"]
    assert sorted(it["path"] for it in index.items) == sorted(names)
    assert all(it["caption"] for it in index.items)  # the sample's annotation caption
    for row, it in enumerate(index.items):
        same_clip = files.by_path[names[it["path"]]]
        assert np.allclose(index.embeddings[row], files.embeddings[same_clip], atol=1e-5)


@pytest.mark.multiproc  # kills a process group
@pytest.mark.slow
def test_embed_resumes_after_a_kill(corpus, built, tmp_path):
    """A run killed after its first parts: the rerun embeds only the rest, and the index equals an
    uninterrupted one."""
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "singularity_ds", "embed", built["ckpt"], str(corpus / "videos"), str(out),
           "--frames", str(FRAMES), "--tokens", "--dtype", "fp32", "--batch", "4", "--part-size", "4"]
    env = dict(os.environ, PYTHONPATH=str(os.path.dirname(os.path.dirname(__file__))), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    done = out / "parts" / "00001" / "done.json"
    deadline = time.time() + 240
    while not done.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done.exists() and not (out / "meta.json").exists(), proc.stderr.read().decode()[-2000:]
    finished = sorted(p.parent.name for p in (out / "parts").glob("*/done.json"))
    assert 2 <= len(finished) < 9
    stamps = {p: p.stat().st_mtime_ns for name in finished for p in (out / "parts" / name).iterdir()}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(finished)} of 9 parts already embedded" in result.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the parts done were not redone
    from singularity_ds.search import Index
    resumed, whole = Index.load(str(out)), Index.load(str(built["index"]))
    assert [it["path"] for it in resumed.items] == [it["path"] for it in whole.items]
    assert np.allclose(resumed.embeddings, whole.embeddings, atol=1e-6)
    assert torch.allclose(resumed.tokens.rows(range(36)), whole.tokens.rows(range(36)), atol=1e-6)
    # another model or other options in the same folder: refused, nothing overwritten
    from singularity_ds.cli import main
    assert main(["embed", built["ckpt"], str(corpus / "videos"), str(out), "--frames", "2"]) == 2


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_rank_embed_equals_one_rank(corpus, built, tmp_path, free_port):
    out = tmp_path / "idx2"
    env = dict(os.environ, PYTHONPATH=str(os.path.dirname(os.path.dirname(__file__))), DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port), "--module",
         "singularity_ds", "embed", built["ckpt"], str(corpus / "videos"), str(out), "--frames", str(FRAMES),
         "--tokens", "--dtype", "fp32", "--batch", "8", "--part-size", "16"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    from singularity_ds.search import Index
    two, one = Index.load(str(out)), Index.load(str(built["index"]))
    assert [it["path"] for it in two.items] == [it["path"] for it in one.items]
    assert np.allclose(two.embeddings, one.embeddings, atol=1e-5)
    assert len(list((out / "parts" / "00000").glob("video_tokens.*.bin"))) == 2  # each rank its rows
    assert torch.allclose(two.tokens.rows(range(36)), one.tokens.rows(range(36)), atol=1e-5)
    # the same folder with other options: every rank stops on rank 0's one line (none waits at a barrier)
    again = subprocess.run(
        ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port), "--module",
         "singularity_ds", "embed", built["ckpt"], str(corpus / "videos"), str(out), "--frames", str(FRAMES),
         "--dtype", "fp32", "--batch", "8", "--part-size", "16"],
        env=env, capture_output=True, text=True, timeout=900)
    err = again.stdout + again.stderr
    assert again.returncode == 2 and "Traceback" not in err, err[-3000:]
    refused = f"singularity-ds: error: {out}: holds an index built with other tokens"
    assert err.count(refused) == 2, err[-3000:]


def test_approximate_vector_index_equals_exact_on_small_data(tmp_path):
    from singularity_ds.search.vectors import VectorIndex
    rng = np.random.default_rng(0)
    data = rng.standard_normal((2000, 64)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    np.save(tmp_path / "e.npy", data)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    exact = VectorIndex(mapped)
    graph = VectorIndex(mapped, cache=str(tmp_path / "v.faiss"), exact_below=0)
    assert exact.exact and not graph.exact and (tmp_path / "v.faiss").is_file()
    queries = data[:50] + 0.05 * rng.standard_normal((50, 64)).astype(np.float32)
    es, ei = exact.search(queries, 10)
    gs, gi = graph.search(queries, 10)
    assert np.array_equal(ei, gi)  # a 2000-row graph searched with efSearch 128 finds the exact top 10
    assert np.allclose(es, gs, atol=1e-5)
    assert np.array_equal(ei[:, 0], np.arange(50))  # each query's own row first
    cached = VectorIndex(mapped, cache=str(tmp_path / "v.faiss"), exact_below=0)  # read back, not rebuilt
    assert np.array_equal(cached.search(queries, 10)[1], gi)
    # per-row weights (a text query: cosine x the row's norm): exact, and the graph's re-scored candidates
    weights = rng.uniform(0.8, 1.0, len(data)).astype(np.float32)
    ws, wi = exact.search(queries, 10, weights)
    full = (queries @ data.T) * weights
    assert np.array_equal(wi, np.argsort(-full, axis=1, kind="stable")[:, :10])
    assert np.allclose(ws, np.sort(full, axis=1)[:, ::-1][:, :10], atol=1e-5)
    gws, gwi = graph.search(queries, 10, weights)
    assert np.array_equal(gwi, wi) and np.allclose(gws, ws, atol=1e-5)


class _Server:
    """``singularity-ds serve``'s app in a real uvicorn server on 127.0.0.1, in a thread."""

    def __init__(self, index_path, port):
        import uvicorn

        from singularity_ds.search import Index
        from singularity_ds.search.serve import make_app
        self.index = Index.load(str(index_path))
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.index), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture(scope="module")
def library(corpus, built, tmp_path_factory):
    """A small library: 12 clips, one symlink pointing out of the media root (a valid clip: embedded,
    never served), and a secret file beside the root."""
    from singularity_ds.cli import main
    base = tmp_path_factory.mktemp("lib")
    lib = base / "media"
    lib.mkdir()
    for name in sorted(os.listdir(corpus / "videos"))[:12]:
        shutil.copy(corpus / "videos" / name, lib / name)
    (base / "secret.txt").write_text("secret")
    outside = base / "outside.mp4"
    shutil.copy(corpus / "videos" / "clip_00030.mp4", outside)
    os.symlink(outside, lib / "link_out.mp4")
    assert main(["embed", built["ckpt"], str(lib), str(base / "index"), "--frames", str(FRAMES),
                 "--tokens"]) == 0
    return base


def test_serve_serves_only_indexed_files_inside_the_media_root(library, free_port):
    with _Server(library / "index", free_port) as s:
        assert "link_out.mp4" in s.index.by_path  # embedded (it is a clip), yet outside the root
        status, body = s.get("/media/clip_00000.mp4")
        assert status == 200 and body == (library / "media" / "clip_00000.mp4").read_bytes()
        status, body = s.get("/thumbs/00000000.jpg")
        assert status == 200 and body[:2] == b"\xff\xd8"
        for path in ["/media/../secret.txt", "/media/%2e%2e/secret.txt", "/media/..%2fsecret.txt",
                     "/media/%2E%2E%2Fsecret.txt", "/media//etc/passwd", "/media/%2Fetc%2Fpasswd",
                     "/media/link_out.mp4", "/media/clip_00000.mp4%00", "/media/nothere.mp4",
                     "/thumbs/..%2F..%2Fsecret.txt", "/thumbs/%2Fetc%2Fpasswd", "/media/"]:
            status, body = s.get(path)
            assert status == 404 and b"secret" not in body and b"root:" not in body, path
        status, body = s.get("/api/search?q=a%20square%20moves&k=3&rerank=5")
        hits = json.loads(body)["hits"]
        assert status == 200 and [h["rank"] for h in hits] == [1, 2, 3]
        assert [h["path"] for h in hits] == [h["path"] for h in s.index.search("a square moves", 3, 5)]
        assert s.get("/api/search?q=")[0] == 422


def _chromium():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium + chromium-driver are not installed (`make system-deps` installs them "
                    "as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_search_page_in_headless_chromium(library, free_port, tmp_path):
    """Type a clip's own caption, see it among the results, click it, watch it play; screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    with _Server(library / "index", free_port) as s:
        query = "a square moves from left to right"
        expected = [h["path"] for h in s.index.search(query, 5, 32)]
        browser = _chromium()
        try:
            browser.get(s.url + "/")
            browser.find_element(By.ID, "q").send_keys(query)
            browser.find_element(By.ID, "go").click()
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .hit")) >= 5)
            hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
            shown = [e.get_attribute("data-path") for e in hits]
            assert shown[:5] == expected  # the server's ranking, in order
            # every thumbnail loaded (a broken <img> has naturalWidth 0)
            assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0
                       for img in browser.find_elements(By.CSS_SELECTOR, "#results img"))
            browser.find_elements(By.CSS_SELECTOR, "#results .hit")[0].click()
            video = wait.until(lambda b: b.find_element(By.ID, "clip"))
            assert video.get_attribute("src").endswith("/media/" + expected[0])
            # it plays: H.264 decodes in Debian's chromium (its ffmpeg carries the codec)
            wait.until(lambda b: b.execute_script(
                "const v = document.getElementById('clip'); return v.readyState >= 2 && v.currentTime > 0 "
                "&& !v.error"))
            shot = tmp_path / "search_page.png"
            browser.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("SEARCH_SCREENSHOT"):  # the README's: SEARCH_SCREENSHOT=docs/search_page.png
                shutil.copy(shot, os.environ["SEARCH_SCREENSHOT"])
        finally:
            browser.quit()
