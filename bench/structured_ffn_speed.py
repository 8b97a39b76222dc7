"""Structured FFN speed: forward and forward+backward time of one FFN (d -> 4d -> GELU -> d) whose two linears are
dense, low-rank, BlockShuffle or BlockDense, against the dense FFN measured in the same run.

    python bench/structured_ffn_speed.py --device cuda          # the issue's grid, bf16 (one H100/H200)
    python bench/structured_ffn_speed.py                        # CPU smoke run: small widths, fp32

Rows (bench/results/<name>.json): method dense | lowrank | blockshuffle | blockdense, plus variants
  "<kind>-plain"    the same factors through plain PyTorch ops (x @ U.T @ V.T, einsum for block-diagonal),
                    the baseline the issue's reference figures were measured with;
  "<kind>-fused"    the same layers through slimkit.structured.kernels.fused_ffn (Triton: bias + GELU in the
                    matmul epilogues, forward and backward; GPU only), "dense-fused" the dense FFN likewise;
  "<kind>-lt"       the same layers through fused_ffn(matmul="cublaslt"): GELU in the forward matmul's cuBLASLt
                    epilogue, GELU' in the backward's (slimkit.structured.epilogue; needs nvmath-python, GPU only),
                    "dense-lt" the dense FFN likewise;
  "<kind>-premerged" the factors merged into one dense matrix (slimkit.structured.merged_linear);
  "<kind>-graph"    forward through slimkit.structured.graphed as users call it (input copied in, CUDA graph
                    replayed, output cloned), its speed-up taken over the dense FFN graphed the same way; fwbw:
                    one training step (forward + backward) captured as a CUDA graph and replayed (graphed_step),
                    over the dense step graphed likewise: the GPU's time alone, with no gaps where the GPU waits
                    for the host to launch the next kernel (GPU only);
  "<kind>-lt-graph" the '-lt' FFN likewise;
  "<kind>-compiled" the same FFN through torch.compile (what `slimkit train-lm --compile` runs: Inductor fuses
                    bias, GELU and the bias-gradient reductions around the cuBLAS matmuls), "dense-compiled" the
                    dense FFN likewise; both against the eager dense FFN (--compile-tokens, GPU default 16384);
  "<kind>-decode"   decoding: a stack of --decode-layers residual FFN blocks (x + FFN(x)) captured as one CUDA graph
                    (slimkit.structured.graphed), as a graph-decoded model runs a step, timed with CUDA events over
                    a loop of replays; against the dense stack graphed the same way (token counts up to 64);
  "<kind>-decode-premerge" the same stack after slimkit.structured.premerge(graph=True), which merges each layer
                    whose merged replay measures faster;
setting "r=0.32 d=2048 T=16384" (r: the target parameter ratio; 'ratio' holds the one the shape rules reach),
metric fw_speedup / fwbw_speedup (dense time / this time), with fw_ms / fwbw_ms alongside.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from slimkit.errors import SlimkitError  # noqa: E402
from slimkit.structured import graphed, make_linear, merged_linear, premerge  # noqa: E402
from slimkit.structured import epilogue  # noqa: E402
from slimkit.structured.kernels import available, eager_ffn, fused_ffn, lt_supported, supported  # noqa: E402
from slimkit.structured.layers import BlockDenseLinear, LowRankLinear  # noqa: E402

KINDS = ("lowrank", "blockshuffle", "blockdense")


class FFN(nn.Module):
    ffn_pair = ("fc1", "fc2")       # premerge times the two linears together, as they run

    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):     # what slimkit's GPT runs: two BlockShuffle layers stay feature-major between
        return eager_ffn(self.fc1, self.fc2, x, approximate="tanh")


class FusedFFN(FFN):
    """The same FFN through slimkit.structured.kernels.fused_ffn (GELU and bias work in the matmul epilogues)."""

    def forward(self, x):
        return fused_ffn(self.fc1, self.fc2, x, approximate="tanh")


class LtFFN(FFN):
    """The same FFN through fused_ffn(matmul="cublaslt"): GELU and GELU' in cuBLASLt epilogues (nvmath-python)."""

    def forward(self, x):
        return fused_ffn(self.fc1, self.fc2, x, approximate="tanh", matmul="cublaslt")


class PlainLowRank(nn.Module):
    """x @ U.T @ V.T with the layer's own factors: what a user would write without slimkit."""

    def __init__(self, layer: LowRankLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y = x @ self.layer.u.t() @ self.layer.v.t()
        return y if self.layer.bias is None else y + self.layer.bias


class PlainBlockDiag(nn.Module):
    """A block-diagonal matmul through einsum on a (tokens, blocks, width) view, then the layer's second factor
    (BlockDense's dense projection, or BlockShuffle's interleave + second block-diagonal matmul)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer, t = self.layer, x.shape[0]
        w1 = layer.blocks if isinstance(layer, BlockDenseLinear) else layer.w1  # (blocks, out_b, in_b)
        b, _, i = w1.shape
        h = torch.einsum("tbi,boi->tbo", x.reshape(t, b, i), w1)
        if isinstance(layer, BlockDenseLinear):
            y = h.reshape(t, -1) @ layer.v.t()
        else:
            h = h.reshape(t, -1, layer.nblocks2).transpose(1, 2)  # the shuffle: middle channel m to block m % l
            y = torch.einsum("tbi,boi->tob", h, layer.w2).reshape(t, -1)  # block j, row s -> channel s*l + j
        return y if layer.bias is None else y + layer.bias


class Residual(nn.Module):
    """x + ffn(x): one decoder block's FFN half, so that a stack of them is a decode step's FFN work."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, x):
        return x + self.ffn(x)


def plain(layer: nn.Module) -> nn.Module:
    return PlainLowRank(layer) if isinstance(layer, LowRankLinear) else PlainBlockDiag(layer)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, reps: int) -> float:
    """Median wall time of fn() in ms (CUDA synchronised around each call) after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


WARM_S = 0.5     # seconds of calls before events_ms times any: the GPU at its sustained clocks


def events_ms(fn, device, reps: int, warm_s: float | None = None) -> float:
    """Median GPU time of fn() in ms, timed by CUDA events around each call with no host synchronisation between
    calls (the host enqueues ahead, as in a training loop), L2 flushed before each call by writing a 256 MiB
    buffer so that no call finds its weights cached from the one before (the method of triton.testing.do_bench).
    Before timing, fn runs for warm_s seconds (WARM_S): an H100 that was idle runs its first second or so of
    work 5-10% faster than under sustained load (its clocks drop to the power limit), so a function timed right
    after an idle moment (the first of a round) gained that much over one timed after another's load, whichever
    it was. On the CPU it falls back to median_ms."""
    if device.type != "cuda":
        return median_ms(fn, device, reps)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    warm_s = WARM_S if warm_s is None else warm_s
    t0 = time.perf_counter()
    while True:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= warm_s:
            break
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


TIMERS = {"sync": median_ms, "events": events_ms}


def loop_ms(fn, iters: int = 200, loops: int = 7, warmup: int = 10) -> float:
    """Median over `loops` of the mean CUDA-event time of `iters` back-to-back calls of fn, in ms: for calls of
    tens of microseconds, where a synchronisation around each call would time the host as much as the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(loops):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def decode_ms(blocks: list[nn.Module], x: torch.Tensor) -> dict:
    """Forward time of the residual stack of `blocks`, replayed as one CUDA graph."""
    replay = graphed(nn.Sequential(*[Residual(b) for b in blocks]).eval(), x, clone_output=False)
    return {"fw_ms": loop_ms(lambda: replay(x))}


def compiled(ffn: nn.Module) -> nn.Module:
    """torch.compile of a fresh copy of the FFN's code path, static shapes, no stale guards from other shapes."""
    torch._dynamo.reset()
    return torch.compile(ffn, dynamic=False)


def graphed_step(ffn: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One training step's forward+backward of `ffn` (parameter and input grads written fresh) captured as a CUDA
    graph after warm-up runs on a side stream; returns its replay. Replaying costs the host one launch, so the time
    of a replay is the GPU's alone, whatever the host's speed (a Python-launched step of many small kernels can
    take the host longer to enqueue than the GPU to run)."""
    xg = x.detach().requires_grad_(True)

    def step():
        ffn(xg).backward(grad)
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            ffn.zero_grad(set_to_none=True)
            xg.grad = None
            step()
    torch.cuda.current_stream(x.device).wait_stream(side)
    ffn.zero_grad(set_to_none=True)   # the captured backward allocates the grads: each replay writes them anew
    xg.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g.replay


def lt_probe_parser(doc: str, rounds: int = 3) -> argparse.ArgumentParser:
    """The '-lt' probes' common options: the FFN (--d, --tokens), what lt_step_rows sweeps (--ratios, --kinds,
    --align) and the timing (--reps, --rounds)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ratios", default="0.25,0.32")
    ap.add_argument("--kinds", default="blockdense,lowrank")
    ap.add_argument("--align", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


def lt_device() -> torch.device:
    """The GPU the '-lt' probes run on, or exit with what they need."""
    dev = torch.device("cuda")
    if not torch.cuda.is_available() or not epilogue.available(torch.empty(1, device=dev)):
        sys.exit("needs a CUDA GPU and nvmath-python (pip install slimkit[cublaslt])")
    return dev


def rounds_ms(steps: dict, device, reps: int, rounds: int) -> list[dict]:
    """Each function's events_ms median in each of `rounds` rounds that take the functions in turn: one
    {name: ms} a round."""
    return [{name: events_ms(step, device, reps) for name, step in steps.items()} for _ in range(rounds)]


def fastest(steps: dict, device, reps: int, rounds: int) -> dict:
    """Each function's events_ms median, the fastest over `rounds` rounds that take the functions in turn (so that
    a slow moment of the card does not pass for a difference between them)."""
    timed = rounds_ms(steps, device, reps, rounds)
    return {name: min(r[name] for r in timed) for name in steps}


def patched(obj, **values):
    """A variant for lt_step_rows: under(capture) runs capture() with obj's attributes set to `values` (restored
    afterwards); no values: as it is."""
    def under(capture):
        old = {k: getattr(obj, k) for k in values}
        for k, v in values.items():
            setattr(obj, k, v)
        try:
            return capture()
        finally:
            for k, v in old.items():
                setattr(obj, k, v)
    return under


PAIR = "\0dense"      # the dense step's key among a round's variants (no variant name collides with it)


def lt_step_rows(d: int, tokens: int, ratios, kinds, align: int, variants: dict, reps: int, rounds: int, device,
                 method=lambda kind, name: f"{kind}{name}-graph", extra=lambda ffn, name: {}) -> list[dict]:
    """The probes' whole-step rows: for each kind and ratio, the '-lt' FFN's training step (bias, GELU tanh, bf16)
    captured as a CUDA graph under each variant (name -> under(capture): runs the capture with the variant in
    force and returns its result) and timed (fastest), over the dense step graphed likewise ('dense-graph' first,
    'dense-graph-again' last). The dense step also runs in every round beside the variants: 'paired' is the median
    over the rounds of that round's dense time over the variant's, both timed in the same state of the card (an
    H100 under sustained load runs a few percent slower than one that was idle, and the first and last dense
    timings differ by that much). Rows: method(kind, name), fwbw_speedup, ms, paired, ratio, plus
    extra(ffn, name)."""
    dt = torch.bfloat16
    x = torch.randn(tokens, d, device=device, dtype=dt)
    grad = torch.randn_like(x)
    dense, _ = build("dense", d, 1.0, device, dt)
    dense_step = graphed_step(dense, x, grad)
    base = fastest({"dense": dense_step}, device, reps, rounds)["dense"]
    rows = [{"model": "ffn", "method": "dense-graph", "setting": f"r=1 d={d} T={tokens}", "metric": "fwbw_ms",
             "value": round(base, 4), "ms": round(base, 4), "ratio": 1.0}]
    for ratio in ratios:
        for kind in kinds:
            ffn, real = build(kind, d, ratio, device, dt, align)
            lt = LtFFN(ffn.fc1, ffn.fc2)
            steps = {name: under(lambda: graphed_step(lt, x, grad)) for name, under in variants.items()}
            timed = rounds_ms({**steps, PAIR: dense_step}, device, reps, rounds)
            for name in steps:
                ms = min(r[name] for r in timed)
                paired = statistics.median(r[PAIR] / r[name] for r in timed)
                rows.append({"model": "ffn", "method": method(kind, name), "setting": f"r={ratio:g} d={d} T={tokens}",
                             "metric": "fwbw_speedup", "value": round(base / ms, 3), "ms": round(ms, 4),
                             "paired": round(paired, 3), "ratio": round(real, 4), **extra(ffn, name)})
                print(rows[-1], flush=True)
            del steps
    again = fastest({"dense": dense_step}, device, reps, rounds)["dense"]
    rows.append({"model": "ffn", "method": "dense-graph-again", "setting": f"r=1 d={d} T={tokens}",
                 "metric": "fwbw_ms", "value": round(again, 4), "ms": round(again, 4), "ratio": 1.0})
    return rows


def measure(ffn: nn.Module, x: torch.Tensor, reps: int, backward: bool = True, graph: bool = False,
            timer=median_ms) -> dict:
    device = x.device
    out = {}
    if graph:
        replay = graphed(ffn.eval(), x)
        out["fw_ms"] = timer(lambda: replay(x), device, reps)
        if backward:
            out["fwbw_ms"] = timer(graphed_step(ffn.train(), x, torch.randn_like(x)), device, reps)
            ffn.zero_grad(set_to_none=True)
        return out
    with torch.no_grad():
        out["fw_ms"] = timer(lambda: ffn(x), device, reps)
    if backward:
        xg = x.detach().requires_grad_(True)
        grad = torch.randn_like(x)    # a fixed upstream gradient: the FFN's own work, no loss around it

        def step():
            ffn.zero_grad(set_to_none=True)   # one training step's backward: grads written, not accumulated
            xg.grad = None
            ffn(xg).backward(grad)
        out["fwbw_ms"] = timer(step, device, reps)
        ffn.zero_grad(set_to_none=True)
    return out


def build(kind: str, d: int, ratio: float, device, dtype, align: int = 8, bias: bool = True) -> tuple[FFN, float]:
    def make(i: int, o: int) -> nn.Module:
        if kind in ("dense", "blockshuffle"):       # BlockShuffle's shape has no rank to align
            return make_linear(kind, i, o, ratio, bias, device=device)
        layer = make_linear(kind, i, o, ratio, bias, device=device, align=align)
        # ranks below 4*align are not rounded to align at all: keep the layers' default multiple of 8 there
        return layer if layer.rank % 8 == 0 else make_linear(kind, i, o, ratio, bias, device=device)
    fc1, fc2 = make(d, 4 * d), make(4 * d, d)
    ffn = FFN(fc1, fc2).to(device=device, dtype=dtype)
    params = sum(p.numel() for n, p in ffn.named_parameters() if not n.endswith("bias"))
    return ffn, params / (2 * 4 * d * d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="results name (default structured_ffn_speed, _cpu on the CPU)")
    ap.add_argument("--dims", default=None, help="d_model list (GPU default 1024,2048,4096; CPU 256,512)")
    ap.add_argument("--tokens", default=None, help="token counts (GPU default 16,512,16384; CPU 16,512)")
    ap.add_argument("--ratios", default="0.5,0.32,0.25")
    ap.add_argument("--kinds", default=",".join(KINDS), help="structured kinds to measure (with --append: re-measure "
                    "some kinds and keep the other rows)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--align", type=int, default=64,
                    help="rank alignment of lowrank/blockdense (64: the tensor-core tile; the layers' default is 8)")
    ap.add_argument("--no-fused", action="store_true", help="skip the '-fused' rows (Triton kernels)")
    ap.add_argument("--no-lt", action="store_true", help="skip the '-lt' rows (cuBLASLt epilogues, nvmath-python)")
    ap.add_argument("--compile-tokens", default=None,
                    help="token counts with '-compiled' rows (torch.compile; GPU default 16384, CPU none)")
    ap.add_argument("--decode-layers", type=int, default=8,
                    help="FFN blocks in the graphed decode stack ('-decode' rows, GPU only; 0: none)")
    ap.add_argument("--no-bias", action="store_true",
                    help="FFN linears without bias, as slimkit's GPT and Llama-style FFNs have them (results name "
                         "default structured_ffn_speed_nobias)")
    ap.add_argument("--timing", choices=sorted(TIMERS), default="sync",
                    help="sync: wall time with a CUDA synchronisation around each call (host latency included); "
                         "events: GPU time from CUDA events around each call, no synchronisation between calls, L2 "
                         "flushed before each (results name gets '_events')")
    ap.add_argument("--append", action="store_true", help="keep the rows of an earlier run that this one does not redo")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = args.name or (("structured_ffn_speed" if gpu else "structured_ffn_speed_cpu") + ("_nobias" * args.no_bias)
                         + ("_events" * (args.timing == "events")))
    meas = functools.partial(measure, timer=TIMERS[args.timing])
    bias = not args.no_bias
    dtype = torch.bfloat16 if gpu else torch.float32
    dims = [int(v) for v in (args.dims or ("1024,2048,4096" if gpu else "256,512")).split(",")]
    tokens = [int(v) for v in (args.tokens or ("16,512,16384" if gpu else "16,512")).split(",")]
    ratios = [float(v) for v in args.ratios.split(",")]
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds takes a comma list of {', '.join(KINDS)}")
    reps = args.reps or (30 if gpu else 5)
    compile_tokens = [int(v) for v in (args.compile_tokens or ("16384" if gpu else "")).split(",") if v]
    decode_layers = args.decode_layers if gpu else 0
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch.manual_seed(0)
    rows, skipped = [], []

    def add(method, setting, ratio, res, base, t0):
        for metric in ("fw", "fwbw"):
            if f"{metric}_ms" not in res or f"{metric}_ms" not in base:
                continue
            rows.append({"model": "ffn", "method": method, "setting": setting, "metric": f"{metric}_speedup",
                         "value": round(base[f"{metric}_ms"] / res[f"{metric}_ms"], 3),
                         "ms": round(res[f"{metric}_ms"], 4), "dense_ms": round(base[f"{metric}_ms"], 4),
                         "ratio": round(ratio, 4), "seconds": round(time.perf_counter() - t0, 2)})

    def save():   # after every setting, so that a run cut short keeps what it measured
        notes = [
            f"One FFN: Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d), both linears of the kind named"
            f"{' and without bias' if args.no_bias else ', with bias'}; x has T tokens. "
            f"{'bf16' if gpu else 'fp32'}; median of {reps} timed calls after 3 warm-up calls, " + (
                "each timed by CUDA events with no synchronisation between calls and L2 flushed before each "
                "(--timing events: GPU time, host latency hidden as in a training loop). " if args.timing == "events"
                else "synchronised around each call (wall time, host latency included). ") +
            "fwbw: forward, then backward of a fixed upstream gradient (no loss), parameter and input grads written "
            f"fresh each call, as in one training step. Ranks aligned to multiples of {args.align} (--align) where "
            "the rank is large enough (layers.lowrank_rank / blockdense_shape).",
            "value = dense time / this time, the dense FFN (nn.Linear) measured in the same run and setting; "
            "'-graph' rows divide the dense FFN's time by the structured FFN's, both called through "
            "slimkit.structured.graphed (input copy, CUDA-graph replay, output clone; the dense one timed before and "
            "after the kinds, the faster kept); '-decode' rows divide the "
            f"graphed dense stack's time by the structured stack's ({decode_layers} blocks, CUDA-event loop).",
            "'ratio' is the parameter ratio the shape rules reach for the target r (BlockShuffle's is set by its "
            "block counts: 1.25/b with one count b for both factors at d -> 4d, the paper's form, kept when within "
            "5% of r; else two counts, e.g. 2 and 8 for exactly 0.25). Two BlockShuffle layers run as slimkit's GPT "
            "runs them (kernels.eager_ffn): hidden activations feature-major between them, no shuffle copies.",
        ] + [f"skipped (no shape meets the ratio): {s}" for s in skipped]
        write_results(name, args.device, rows, notes=notes, append=args.append,
                      columns=("model", "method", "setting", "metric", "value", "ms", "dense_ms", "ratio", "seconds"))

    for d in dims:
        for T in tokens:
            x = torch.randn(T, d, device=device, dtype=dtype)
            dense, _ = build("dense", d, 1.0, device, dtype, bias=bias)
            t0 = time.perf_counter()
            base = meas(dense, x, reps)
            base_graph = meas(dense, x, reps, graph=True) if gpu else None
            add("dense", f"r=1 d={d} T={T}", 1.0, base, base, t0)
            fuse = available(x) and not args.no_fused
            lt = epilogue.available(x) and not args.no_lt
            comp = T in compile_tokens
            dec = decode_layers > 0 and T <= 64        # decoding batch sizes
            if comp:
                t0 = time.perf_counter()
                add("dense-compiled", f"r=1 d={d} T={T}", 1.0, meas(compiled(dense), x, reps), base, t0)
            if dec:
                base_dec = decode_ms([build("dense", d, 1.0, device, dtype, bias=bias)[0]
                                      for _ in range(decode_layers)], x)
            if lt:
                t0 = time.perf_counter()
                add("dense-lt", f"r=1 d={d} T={T}", 1.0, meas(LtFFN(dense.fc1, dense.fc2), x, reps), base, t0)
            if fuse:
                t0 = time.perf_counter()
                add("dense-fused", f"r=1 d={d} T={T}", 1.0, meas(FusedFFN(dense.fc1, dense.fc2), x, reps), base, t0)
            print(f"d={d} T={T} dense fw {base['fw_ms']:.4f} ms fwbw {base['fwbw_ms']:.4f} ms", flush=True)
            graph_rows = []     # (row, the structured FFN's graphed time): re-based below if the dense one drops
            for ratio in ratios:
                setting = f"r={ratio:g} d={d} T={T}"
                for kind in kinds:
                    try:
                        ffn, real = build(kind, d, ratio, device, dtype, args.align, bias)
                    except SlimkitError as e:
                        skipped.append(f"{kind} {setting}: {str(e).splitlines()[0]}")
                        continue
                    t0 = time.perf_counter()
                    add(kind, setting, real, meas(ffn, x, reps), base, t0)
                    if lt and lt_supported(ffn.fc1, ffn.fc2):
                        t0 = time.perf_counter()
                        add(f"{kind}-lt", setting, real, meas(LtFFN(ffn.fc1, ffn.fc2), x, reps), base, t0)
                        t0 = time.perf_counter()
                        res = meas(LtFFN(ffn.fc1, ffn.fc2), x, reps, graph=True)
                        add(f"{kind}-lt-graph", setting, real, res, base_graph, t0)
                        graph_rows += [(r, res[f"{r['metric'][:-8]}_ms"]) for r in rows[-2:]]
                    if fuse and supported(ffn.fc1):
                        t0 = time.perf_counter()
                        add(f"{kind}-fused", setting, real, meas(FusedFFN(ffn.fc1, ffn.fc2), x, reps), base, t0)
                    if comp:
                        t0 = time.perf_counter()
                        add(f"{kind}-compiled", setting, real, meas(compiled(ffn), x, reps), base, t0)
                    if dec:
                        t0 = time.perf_counter()
                        stack = [ffn] + [build(kind, d, ratio, device, dtype, args.align, bias)[0]
                                         for _ in range(decode_layers - 1)]
                        add(f"{kind}-decode", setting, real, decode_ms(stack, x), base_dec, t0)
                        t0 = time.perf_counter()
                        chosen = [premerge(b, T, graph=True) for b in map(copy.deepcopy, stack)]
                        add(f"{kind}-decode-premerge", setting, real, decode_ms(chosen, x), base_dec, t0)
                        del stack, chosen
                    t0 = time.perf_counter()
                    naive = FFN(plain(ffn.fc1), plain(ffn.fc2))
                    add(f"{kind}-plain", setting, real, meas(naive, x, reps), base, t0)
                    t0 = time.perf_counter()
                    merged = FFN(merged_linear(ffn.fc1), merged_linear(ffn.fc2))
                    add(f"{kind}-premerged", setting, real, meas(merged, x, reps, backward=False), base, t0)
                    if gpu:
                        t0 = time.perf_counter()
                        res = meas(ffn, x, reps, graph=True)
                        add(f"{kind}-graph", setting, real, res, base_graph, t0)
                        graph_rows += [(r, res[f"{r['metric'][:-8]}_ms"]) for r in rows[-2:]]
                    del ffn, naive, merged
                    got = {r["method"]: r["value"] for r in rows if r["setting"] == setting and r["metric"] == "fw_speedup"}
                    print(f"  {setting} {kind} (ratio {real:.3f}): fw x{got.get(kind)}", flush=True)
            if gpu:   # the graphed dense FFN once more: one replay per call can catch a slow moment; keep the faster
                again = meas(dense, x, reps, graph=True)
                for row, ms in graph_rows:
                    metric = row["metric"][:-8]          # fw / fwbw
                    if again[f"{metric}_ms"] < base_graph[f"{metric}_ms"]:
                        row.update(value=round(again[f"{metric}_ms"] / ms, 3), dense_ms=round(again[f"{metric}_ms"], 4))
            del dense
            save()
if __name__ == "__main__":
    main()
