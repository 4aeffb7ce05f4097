"""Nearest neighbours over an index's embeddings by inner product (cosine: the rows are L2-normalised).

Below ``EXACT_BELOW`` rows the search is exact: a blockwise matrix product and top-k, the evaluation's
:func:`~singularity_ds.eval.retrieval.topk_blockwise`. Above it, a faiss HNSW graph (approximate; the
choice and its numbers: README "Search your videos", docs/benchmarks.md), built once and cached
beside the embeddings as ``vectors.faiss``."""
import logging
import os

import numpy as np
import torch

from ..eval.retrieval import topk_blockwise

logger = logging.getLogger(__name__)

# rows from which a query's exact matrix product costs more than the graph search (docs/benchmarks.md)
EXACT_BELOW = 200_000
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
            graph = faiss.read_index(cache)
            if graph.ntotal == len(embeddings):
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

    def search(self, queries: np.ndarray, k: int):
        queries = np.array(np.atleast_2d(queries), dtype=np.float32)  # a writable copy (rows of a memory map)
        k = min(k, self.rows)
        if self.exact:
            scores, ids = topk_blockwise(torch.from_numpy(queries), self.matrix, k)
            return scores.numpy(), ids.numpy().astype(np.int64)
        scores, ids = self.graph.search(queries, k)
        return scores, ids
