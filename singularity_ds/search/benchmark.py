"""``singularity-ds bench vectors``: faiss-cpu against usearch on random unit vectors, side by side in
one process (build time, query latency, memory, recall@k of the approximate indexes against exact
search), so that the choice in :mod:`.vectors` rests on numbers taken on the same machine load."""
import gc
import os
import time

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def run(n: int = 1_000_000, dim: int = 256, queries: int = 200, k: int = 10, seed: int = 0,
        threads: int = None) -> list:
    """-> one dict per index: name, build_s, query_ms (one query at a time, mean), memory_mib (resident
    growth while building), recall (vs exact)."""
    import faiss
    from usearch.index import Index as USearchIndex
    threads = threads or os.cpu_count()
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    # queries near stored vectors (a text close to some videos), not uniform noise where every
    # neighbour is equally far and recall means little
    q = data[rng.choice(n, queries, replace=False)] + 0.5 / np.sqrt(dim) * rng.standard_normal(
        (queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows = []

    def size(index):  # bytes held by the index (resident growth misses reused freed pages)
        if isinstance(index, np.ndarray):
            return index.nbytes
        if hasattr(index, "ntotal"):
            return faiss.serialize_index(index).nbytes
        return index.memory_usage

    def measure(name, build, search):
        gc.collect()
        before = _rss_mib()
        t0 = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - t0
        memory = max(_rss_mib() - before, size(index) / 2 ** 20)
        search(index, q[:5])  # warm
        t0 = time.perf_counter()
        found = np.stack([search(index, q[i:i + 1])[0] for i in range(queries)])
        query_ms = (time.perf_counter() - t0) / queries * 1e3
        rows.append(dict(name=name, build_s=build_s, query_ms=query_ms, memory_mib=memory, found=found))
        del index
        gc.collect()

    measure("exact (numpy matrix product)", lambda: data,
            lambda idx, x: np.argpartition(-(x @ idx.T), k, axis=1)[:, :k])
    measure("faiss IndexFlatIP (exact)", lambda: _faiss_flat(faiss, data),
            lambda idx, x: idx.search(x, k)[1])
    measure("faiss HNSW32 (efConstruction 128, efSearch 64)", lambda: _faiss_hnsw(faiss, data),
            lambda idx, x: idx.search(x, k)[1])
    measure("faiss IVF-Flat n/256 lists (nprobe 32)", lambda: _faiss_ivf(faiss, data),
            lambda idx, x: idx.search(x, k)[1])

    def usearch_build():
        index = USearchIndex(ndim=dim, metric="ip", dtype="f32", connectivity=32, expansion_search=64)
        index.add(np.arange(n, dtype=np.uint64), data, threads=threads)
        return index
    measure("usearch HNSW32 f32 (expansion_search 64)", usearch_build,
            lambda idx, x: np.asarray(idx.search(x, k).keys).reshape(len(x), -1))

    exact = rows[0]["found"]
    for r in rows:
        r["recall"] = _recall(r.pop("found"), exact)
    return rows


def _faiss_flat(faiss, data):
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    return index


def _faiss_hnsw(faiss, data):
    index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128  # usearch's default expansion_add: the same graph effort
    index.hnsw.efSearch = 64
    index.add(data)
    return index


def _faiss_ivf(faiss, data):
    lists = max(16, min(4096, len(data) // 256))  # ~sqrt(n) * 4 lists; faiss wants >= 39 points each
    quantizer = faiss.IndexFlatIP(data.shape[1])
    index = faiss.IndexIVFFlat(quantizer, data.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.train(data[::max(1, len(data) // (lists * 64))])
    index.add(data)
    index.nprobe = 32
    return index


def table(rows) -> str:
    lines = ["| index | build s | query ms (1 query) | memory MiB | recall@10 vs exact |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['build_s']:.1f} | {r['query_ms']:.2f} | {r['memory_mib']:.0f} | "
                     f"{r['recall']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    out = run(n)
    print(table(out))
