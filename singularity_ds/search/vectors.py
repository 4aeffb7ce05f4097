"""Nearest neighbours over an index's embeddings by inner product (cosine: the rows are L2-normalised),
optionally weighted per row (``weights``: a text query's ITC score is the cosine times the row's norm,
:mod:`.embed`).

Below ``EXACT_BELOW`` rows the search is exact: one matrix product and top-k. Above it, a faiss HNSW
graph (approximate; the choice and its numbers: README "Search your videos", docs/benchmarks.md),
built once and cached beside the embeddings as ``vectors.faiss``; with weights, the graph's
``WEIGHTED_DEPTH`` x k best cosines are re-scored."""
import logging
import os

import numpy as np
import torch

logger = logging.getLogger(__name__)

# rows from which a query's exact matrix product costs more than the graph search (docs/benchmarks.md)
EXACT_BELOW = 200_000
WEIGHTED_DEPTH = 4
HNSW_M, EF_CONSTRUCTION, EF_SEARCH = 32, 128, 128


class VectorIndex:
    """``search(queries (q, d), k)`` -> (scores (q, k) float32, row ids (q, k) int64), best first."""

    def __init__(self, embeddings: np.ndarray, cache: str = None, exact_below: int = EXACT_BELOW):
        """``cache``: where the graph is kept; it is rebuilt when older than ``embeddings``' file
        (``embeddings.filename``, a memory map) or of another size."""
        self.rows, self.dim = embeddings.shape
        self.exact = self.rows < exact_below
        if self.exact:
            self.matrix = torch.from_numpy(np.array(embeddings, dtype=np.float32))  # a copy: writable
        else:
            self.graph = self._graph(embeddings, cache)

    @staticmethod
    def _graph(embeddings, cache):
        import faiss
        source = getattr(embeddings, "filename", None)
        if (cache and os.path.exists(cache)
                and (source is None or os.path.getmtime(cache) >= os.path.getmtime(source))):
            try:
                graph = faiss.read_index(cache)
            except RuntimeError as e:  # a damaged cache is only a cache: built again below
                logger.warning("%s: unreadable (%s); building it again", cache, str(e).splitlines()[0])
                graph = None
            if graph is not None and graph.ntotal == len(embeddings):
                graph.hnsw.efSearch = EF_SEARCH
                return graph
        logger.info("building the HNSW graph of %d vectors (once; cached in %s)", len(embeddings), cache)
        graph = faiss.IndexHNSWFlat(embeddings.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = EF_CONSTRUCTION
        for start in range(0, len(embeddings), 65536):  # fp16 files: convert a block at a time
            graph.add(np.ascontiguousarray(embeddings[start:start + 65536], dtype=np.float32))
        graph.hnsw.efSearch = EF_SEARCH
        if cache:
            faiss.write_index(graph, cache + ".part")
            os.replace(cache + ".part", cache)
        return graph

    def search(self, queries: np.ndarray, k: int, weights: np.ndarray = None):
        """-> (scores, row ids), each (q, k), best first: by ``query . row`` (x ``weights[row]``)."""
        queries = np.array(np.atleast_2d(queries), dtype=np.float32)  # a writable copy (rows of a memory map)
        k = min(k, self.rows)
        w = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if self.exact:
            scores = torch.from_numpy(queries) @ self.matrix.T
            if w is not None:
                scores *= w
            top = scores.topk(k, dim=1)
            return top.values.numpy(), top.indices.numpy().astype(np.int64)
        depth = min(self.rows, k * WEIGHTED_DEPTH) if w is not None else k
        scores, ids = self.graph.search(queries, depth)
        if w is None:
            return scores, ids
        scores = np.where(ids >= 0, scores * w.numpy()[np.maximum(ids, 0)], -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
