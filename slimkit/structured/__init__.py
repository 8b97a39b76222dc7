"""Structured feed-forward layers (low-rank, block-diagonal), self-guided training; pre-merge and CUDA graphs to decode.

Wei et al., "Building on Efficient Foundations: Effectively Training LLMs with Structured Feedforward Layers"
(arXiv 2406.16450). Each module's docstring names what it took from the paper's code (CLAIRE-Labo/StructuredFFN).
"""
from .decode import GraphedModule, graphed
from .kernels import blockshuffle_ffn, structured_ffn_small
from .layers import (BlockDenseLinear, BlockShuffleLinear, LowRankLinear, StructuredLinear, forward_flops,
                     make_linear)
from .premerge import MergeChoice, PairChoice, choose_merge, choose_pair_merge, merged_linear, premerge
from .replace import ffn_linears, load_structured, replace_ffn, save_structured
from .self_guided import SelfGuided, SelfGuidedSchedule, drop_guides, set_progress, train_flops_per_token

__all__ = ["make_linear", "LowRankLinear", "BlockShuffleLinear", "BlockDenseLinear", "StructuredLinear",
           "blockshuffle_ffn", "forward_flops", "replace_ffn", "ffn_linears", "save_structured", "load_structured", "SelfGuided",
           "SelfGuidedSchedule", "set_progress", "drop_guides", "train_flops_per_token", "premerge",
           "choose_merge", "choose_pair_merge", "merged_linear", "MergeChoice", "PairChoice", "graphed", "GraphedModule",
           "structured_ffn_small"]
