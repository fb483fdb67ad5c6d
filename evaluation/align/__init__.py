"""Alignment analysis (REPA Fig. 2, 3): CKNNA (`metric`), linear probe (`probe`), hidden states of a checkpoint
(`model`), the images it reads (`data`), figures (`plot`) and `python -m evaluation align` (`cli`)."""
from evaluation.align.metric import (DEFAULT_K, KnnGraph, cknna, cknna_dense, cknna_graphs, graph_cross_hsic,
                                     graph_self_hsic, hsic_unbiased, knn_graph, pool_tokens)

__all__ = ["DEFAULT_K", "KnnGraph", "cknna", "cknna_dense", "cknna_graphs", "graph_cross_hsic", "graph_self_hsic",
           "hsic_unbiased", "knn_graph", "pool_tokens"]
