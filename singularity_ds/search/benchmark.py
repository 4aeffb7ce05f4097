"""``singularity-ds bench vectors``: faiss-cpu against usearch on random unit vectors, side by side in
one process (build time, query latency, memory, recall@k of the approximate indexes against exact
search), so that the choice in :mod:`.vectors` rests on numbers taken on the same machine load."""
import gc
import os
import time

import numpy as np
import torch

from .vectors import EF_CONSTRUCTION, EF_SEARCH, HNSW_M  # the settings search uses


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact)]))


def run(n: int = 1_000_000, ann_n: int = 1_000_000, dim: int = 256, queries: int = 100, k: int = 10,
        seed: int = 0, threads: int = None) -> list:
    """-> one dict per index: name, rows, build_s, query_ms (one query at a time, mean), memory_mib (index
    size, or resident growth while building if larger), recall (vs exact on the same rows). Exact search
    runs on ``n`` rows, the graph indexes on the first ``ann_n`` (their builds dominate the time)."""
    import faiss
    from usearch.index import Index as USearchIndex
    threads = threads or os.cpu_count()
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, dim), dtype=np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ann = data[:ann_n]
    # queries near stored vectors (a text close to some videos), not uniform noise where every
    # neighbour is equally far and recall means little
    noise = 0.5 / np.sqrt(dim) * rng.standard_normal((queries, dim), dtype=np.float32)
    q = ann[rng.choice(len(ann), queries, replace=False)] + noise
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    rows, truth = [], {}

    def size(index):  # bytes held by the index (resident growth misses reused freed pages)
        if isinstance(index, torch.Tensor):
            return index.numel() * index.element_size()
        if hasattr(index, "ntotal"):
            return faiss.serialize_index(index).nbytes
        return index.memory_usage

    def measure(name, rows_of, build, search):
        gc.collect()
        before = _rss_mib()
        t0 = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - t0
        memory = max(_rss_mib() - before, size(index) / 2 ** 20)
        search(index, q[:3])  # warm
        t0 = time.perf_counter()
        found = np.stack([np.asarray(search(index, q[i:i + 1])).reshape(-1)[:k] for i in range(queries)])
        query_ms = (time.perf_counter() - t0) / queries * 1e3
        if rows_of not in truth:  # exact top-k on these rows: the reference for recall
            truth[rows_of] = np.argsort(-(q @ (data if rows_of == n else ann).T), axis=1)[:, :k]
        recall = _recall(found, truth[rows_of])
        rows.append(dict(name=name, rows=rows_of, build_s=build_s, query_ms=query_ms, memory_mib=memory,
                         recall=recall))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        del index
        gc.collect()

    measure("exact: torch matrix product + top-k", n, lambda: torch.from_numpy(data),
            lambda idx, x: (torch.from_numpy(x) @ idx.T).topk(k, dim=1).indices.numpy())
    measure("faiss IndexFlatIP (exact)", n, lambda: _faiss_flat(faiss, data),
            lambda idx, x: idx.search(x, k)[1])
    measure(f"faiss HNSW{HNSW_M} (efConstruction {EF_CONSTRUCTION}, efSearch {EF_SEARCH})", ann_n,
            lambda: _faiss_hnsw(faiss, ann), lambda idx, x: idx.search(x, k)[1])

    def usearch_build():
        index = USearchIndex(ndim=dim, metric="ip", dtype="f32", connectivity=HNSW_M,
                             expansion_add=EF_CONSTRUCTION, expansion_search=EF_SEARCH)
        index.add(np.arange(len(ann), dtype=np.uint64), ann, threads=threads)
        return index
    measure(f"usearch HNSW{HNSW_M} f32 (expansion_add {EF_CONSTRUCTION}, expansion_search {EF_SEARCH})",
            ann_n, usearch_build, lambda idx, x: np.asarray(idx.search(x, k).keys).reshape(len(x), -1))
    return rows


def _faiss_flat(faiss, data):
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    return index


def _faiss_hnsw(faiss, data):
    index = faiss.IndexHNSWFlat(data.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.hnsw.efSearch = EF_SEARCH
    index.add(data)
    return index


def table(rows) -> str:
    lines = ["| index | rows | build s | query ms (1 query) | memory MiB | recall@10 vs exact |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['rows']:,} | {r['build_s']:.1f} | {r['query_ms']:.2f} | "
                     f"{r['memory_mib']:.0f} | {r['recall']:.3f} |")
    return "\n".join(lines)


def main(argv) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="singularity-ds bench vectors",
                                description="faiss-cpu vs usearch vs exact search on random unit vectors")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows for exact search")
    p.add_argument("--graph-rows", type=int, default=1_000_000, help="rows for the HNSW graphs (their builds "
                                                                       "dominate the time)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=100)
    a = p.parse_args(argv)
    print(table(run(a.rows, a.graph_rows, a.dim, a.queries)))
    return 0


if __name__ == "__main__":  # python -m singularity_ds.search.benchmark [ROWS [GRAPH_ROWS]]
    import sys
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    out = run(n, int(sys.argv[2]) if len(sys.argv) > 2 else n)
    print(table(out))
