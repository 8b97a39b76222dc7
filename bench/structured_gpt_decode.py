"""Decoding with slimkit's GPT: tokens per second of GPT.generate (a KV cache: the prompt read once, then one
forward of the batch's new tokens a step) for a GPT whose FFNs are dense, low-rank, BlockShuffle or BlockDense,
as trained and after premerge(tokens=batch) (structured factors merged where that measures faster), against the
dense GPT in the same run and mode: the figure is what `slimkit generate-lm` sees. Two modes on a GPU (--modes):
"eager" (every step's kernels launched by the host) and "graph" (generate(cuda_graph=True), its default there:
each step after the prompt one CUDA-graph replay over a static KV cache, the structured FFNs through the
small-token kernels). generate keeps its capture for the next call of the same shape, so the timed calls replay
the one the warm-up call made: first_ms gives that first call's time (capture, and any kernel compiles of the
process, included). The CPU runs eager only.

    python bench/structured_gpt_decode.py                      # CPU: d 512, 4 layers, batch 1 and 16, fp32
    python bench/structured_gpt_decode.py --device cuda        # d 2048, 4 layers, bf16 weights

Rows (bench/results/<name>.json): model "gpt-d<d>-L<layers>", method dense | lowrank | blockshuffle | blockdense,
"-premerge" after premerge, "-graph" in the graph mode (premerge then timing graph replays), setting "r=0.32 B=16 T=64" (B: sequences decoded together, T: new tokens each),
metric decode_speedup (the dense GPT's time / this one's) with ms_per_step (one new token for each of the B
sequences), dense_ms and first_ms, and metric tokens_per_s (B * T / the generate call's time). Greedy decoding from a
random 16-token prompt. Paired timing: each round times one dense and one structured generate call, and
decode_speedup is the median over --reps rounds of their ratio (a shared CPU drifts by 20% between minutes). In
the graph mode a "dense-graph" row gives the dense GPT's graphed speed over its eager one.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from slimkit.errors import SlimkitError  # noqa: E402
from slimkit.structured import premerge, replace_ffn  # noqa: E402
from slimkit.structured.gpt import GPT, GPTConfig  # noqa: E402

KINDS = ("lowrank", "blockshuffle", "blockdense")
PROMPT = 16
NOTES = [__doc__.split("\n\n")[0].replace("\n", " "), "Paired timing: each round times one dense and one "
         "structured generate call; decode_speedup is the median over rounds of dense / structured, ms_per_step and "
         "dense_ms the medians of each (a generate call's time over its new tokens, the prompt's read included)."]


def _prompt(model: GPT, batch: int, device: torch.device) -> torch.Tensor:
    idx = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    return idx.to(device)


def _call_ms(model: GPT, idx: torch.Tensor, new: int, device: torch.device, graph: bool = False) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(idx, new, temperature=0, cuda_graph=graph)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def paired_ms(model: GPT, dense: GPT, batch: int, new: int, reps: int, device: torch.device, graph: bool = False,
              dense_graph: bool | None = None) -> tuple[float, float, float, float]:
    """(median ms of model's generate call, of dense's, median over rounds of dense / model within a round, ms of
    model's first call): the
    two alternate, one call each a round after one warm-up call each, so that both are timed in the same state
    of a shared, throttling machine. graph: generate's cuda_graph for model (and for dense, unless dense_graph)."""
    dense_graph = graph if dense_graph is None else dense_graph
    idx = _prompt(model, batch, device)
    first = _call_ms(model, idx, new, device, graph)     # warm-up: allocations, kernel choice, compiles, capture
    _call_ms(dense, idx, new, device, dense_graph)
    mine, base = [], []
    for _ in range(reps):
        base.append(_call_ms(dense, idx, new, device, dense_graph))
        mine.append(_call_ms(model, idx, new, device, graph))
    return (statistics.median(mine), statistics.median(base), statistics.median(b / m for b, m in zip(base, mine)),
            first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="results name (default structured_gpt_decode, _cpu on the CPU)")
    ap.add_argument("--d-model", type=int, default=None, help="width (GPU default 2048, CPU 512)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batches", default="1,16", help="sequences decoded together")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ratios", default="0.32,0.25")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", default=None, help="eager,graph (default on a GPU; the CPU runs eager only)")
    ap.add_argument("--append", action="store_true", help="keep the results file's other rows (a run in parts)")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit("--device cuda, but no CUDA GPU is available")
    modes = (args.modes or ("eager,graph" if gpu else "eager")).split(",")
    if not set(modes) <= {"eager", "graph"} or "graph" in modes and not gpu:
        sys.exit(f"--modes: eager and graph (graph on a GPU only), got {args.modes!r}")
    d = args.d_model or (2048 if gpu else 512)
    dtype = torch.bfloat16 if gpu else torch.float32
    name = args.name or ("structured_gpt_decode" if gpu else "structured_gpt_decode_cpu")
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.n_layer, n_head=max(1, d // 64), d_model=d,
                    seq_len=PROMPT + args.new_tokens)
    model_name = f"gpt-d{d}-L{args.n_layer}"
    torch.manual_seed(0)
    dense = GPT(cfg).to(device=device, dtype=dtype).eval()
    rows = []

    def add(method, setting, timed, batch, t0):
        ms, base_ms, speedup, first_ms = timed
        rows.append({"model": model_name, "method": method, "setting": setting, "metric": "decode_speedup",
                     "value": round(speedup, 3), "ms_per_step": round(ms / args.new_tokens, 4),
                     "dense_ms": round(base_ms / args.new_tokens, 4), "first_ms": round(first_ms, 2),
                     "seconds": round(time.perf_counter() - t0, 2)})
        rows.append({"model": model_name, "method": method, "setting": setting, "metric": "tokens_per_s",
                     "value": round(batch * args.new_tokens / ms * 1e3, 1), "seconds": 0.0})

    def save():
        write_results(name, args.device, rows, notes=NOTES, append=args.append,
                      columns=("model", "method", "setting", "metric", "value", "ms_per_step", "dense_ms", "first_ms",
                               "seconds"))

    for batch in [int(b) for b in args.batches.split(",")]:
        if "graph" in modes and "eager" in modes:     # what graphs give the dense GPT itself
            t0 = time.perf_counter()
            add("dense-graph", f"r=1 B={batch} T={args.new_tokens}",
                paired_ms(dense, dense, batch, args.new_tokens, args.reps, device, True, False), batch, t0)
            print(f"  B={batch} dense graphed over eager: x{rows[-2]['value']}", flush=True)
            save()
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for kind in args.kinds.split(","):
                setting = f"r={ratio:g} B={batch} T={args.new_tokens}"
                try:
                    model = replace_ffn(copy.deepcopy(dense), kind, ratio).to(device=device, dtype=dtype).eval()
                except SlimkitError as e:
                    print(f"  skipped {kind} {setting}: {str(e).splitlines()[0]}")
                    continue
                for mode in modes:
                    graph, tag = mode == "graph", "-graph" if mode == "graph" else ""
                    timed = lambda m: paired_ms(m, dense, batch, args.new_tokens, args.reps, device, graph)  # noqa: E731
                    t0 = time.perf_counter()
                    add(f"{kind}{tag}", setting, timed(model), batch, t0)
                    t0 = time.perf_counter()
                    add(f"{kind}-premerge{tag}", setting, timed(premerge(copy.deepcopy(model), tokens=batch,
                                                                         graph=graph)), batch, t0)
                    print(f"  {setting} {kind}{tag}: x{rows[-4]['value']}, premerged x{rows[-2]['value']} (dense "
                          f"{rows[-2]['dense_ms']:.3f} ms a step)", flush=True)
                    save()


if __name__ == "__main__":
    main()
