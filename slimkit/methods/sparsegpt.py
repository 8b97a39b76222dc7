"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning that updates the surviving weights to compensate.

Per linear layer with calibration inputs X (tokens x in), H = 2 X^T X / n + damp * mean(diag) * I. Columns are
processed left to right in blocks of 128: inside a block, the weights with the smallest w^2 / [H^-1]_jj^2 are
pruned (the block's share of the layer's count, over all rows: the paper's adaptive mask selection), and each
pruned or kept column's error is spread over the later columns through the upper Cholesky factor of H^-1 (the
optimal brain surgeon update), so the layer's output on X changes as little as possible.
Layers are pruned block by block (transformer blocks in order; each block's inputs come from the already
pruned blocks before it), as the paper runs it: the first block's inputs are captured once, and each pruned
block's outputs become the next one's inputs. Every block runs twice per calibration batch (to record its layers'
inputs, then pruned, to pass its outputs on), never the whole model again; blocks of another attention kind
(Qwen2's sliding-window layers) get their own masks. The inputs of one block are held in memory: 128 sequences
of 2048 tokens at width 576 take 0.6 GB in fp32. A model without transformer blocks is one block.
"""
from __future__ import annotations

import torch
from torch import nn

from tqdm.auto import tqdm

from ..core.sparsity import feed_inputs, record_inputs
from ..core.wrap import is_conv1d, weight_oi

BATCH = 8       # calibration sequences per forward


class _Hessians:
    """on_input for record_inputs: accumulates 2 X^T X / n (fp32) per layer."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + 2 * x.t() @ x
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}


def hessians(model: nn.Module, layers: dict[str, nn.Module], data: torch.Tensor, device: torch.device,
             batch_size: int = BATCH, stop_at: nn.Module | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """2 X^T X / n (fp32) of each layer's inputs over the calibration tokens; the forward stops after `stop_at`."""
    acc = _Hessians()
    feed_inputs(model, layers, data, device, acc, "sparsegpt", batch_size, stop_at, progress)
    return acc.result()


@torch.no_grad()
def prune_layer(layer: nn.Module, h: torch.Tensor, pruned: int, blocksize: int = 128,
                damp: float = 0.01) -> torch.Tensor:
    """Prune exactly `pruned` weights of `layer` in place by SparseGPT's update; returns the keep-mask (shaped
    as the weight parameter)."""
    w_view = weight_oi(layer)
    w = w_view.detach().float().clone()
    rows, cols = w.shape
    h = h.to(w.device).clone()
    # inputs never active: nothing to preserve there. The reference zeroes their weights up front; pruning them
    # first instead (score below every other) gives the same layer while they fit the pruning budget, and keeps
    # the rest unchanged (they never act) where they do not, so the layer loses exactly `pruned` weights
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    per_block = [((i2 * pruned) // cols) - ((i1 * pruned) // cols)
                 for i1, i2 in ((i, min(i + blocksize, cols)) for i in range(0, cols, blocksize))]
    keep = torch.ones_like(w, dtype=torch.bool)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        score = w1.pow(2) / torch.diag(hinv1).pow(2)[None, :]
        score[:, dead[i1:i2]] = -1.0
        drop = torch.zeros_like(w1, dtype=torch.bool).flatten()
        drop[torch.argsort(score.flatten(), stable=True)[:per_block[b]]] = True
        drop = drop.view_as(w1)
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.where(drop[:, i], torch.zeros_like(col), col)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~drop
    w_view.copy_(torch.where(keep, w, torch.zeros_like(w)).to(w_view.dtype))
    return keep.t().contiguous() if is_conv1d(layer) else keep


def sparsegpt(model: nn.Module, layers: dict[str, nn.Module], blocks: list[str], counts: dict[str, int],
              data: torch.Tensor, device: torch.device, progress: bool = False) -> dict[str, torch.Tensor]:
    """Prune `model` in place, block by block (`blocks`: a Hugging Face transformer's block paths in forward
    order; each block's layers see inputs through the pruned blocks before it); layers outside the blocks (or
    all, without blocks) are pruned together last, from one pass of the whole model. Returns the keep-masks."""
    model.eval().to(device)
    masks = {}
    if blocks:
        from ..core.families import layout
        from ..transformer import first_block_inputs, inputs_by_layer_type, layer_types, run_block, with_layer_arguments

        lay = layout(model)
        batches = [{"input_ids": data[i:i + BATCH]} for i in range(0, data.shape[0], BATCH)]
        inputs = first_block_inputs(model, lay, batches, device)
        types = layer_types(model, lay) if list(blocks) == list(lay.blocks) else None
        by_type = inputs_by_layer_type(model, lay, batches, device, types) if types else None
        for i, path in enumerate(tqdm(blocks, desc="sparsegpt", disable=not progress)):
            inputs = with_layer_arguments(inputs, i, types, by_type)
            block = model.get_submodule(path)
            names = [k for k in layers if k.startswith(path + ".")]
            if names:
                acc = _Hessians()
                with torch.no_grad():
                    record_inputs({k: layers[k] for k in names}, acc, "sparsegpt",
                                  lambda: run_block(block, inputs, device))
                hs = acc.result()
                for k in names:
                    masks[k] = prune_layer(layers[k], hs[k], counts[k])
            inputs = [(out, args, kwargs) for out, (_, args, kwargs) in zip(run_block(block, inputs, device), inputs)]
        del inputs
    rest = {k: m for k, m in layers.items() if k not in masks}
    if rest:
        with torch.no_grad():
            hs = hessians(model, rest, data, device, progress=progress)
        for k, m in rest.items():
            masks[k] = prune_layer(m, hs[k], counts[k])
    return masks
