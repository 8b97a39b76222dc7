"""Can GELU ride in the matmul epilogues of the feature-major BlockShuffle FFN? A probe (GPU only).

slimkit's BlockShuffle FFN (kernels.blockshuffle_ffn) runs every matmul in cuBLAS and GELU in separate passes over
the (hidden x tokens) activations: forward, bias + GELU reads the pre-activation and writes the activation; backward,
GELU' reads the activation gradient and the pre-activation and writes their product. At d_model 2048, 25% and 16384
tokens those passes move about 1.3 GB per step. In a matmul epilogue they would move half of that:
- fc1's second factor writes pre and act at once (no re-read of pre);
- fc2's first factor's input gradient is multiplied by GELU'(pre) before it is stored (no write and re-read of the
  activation gradient).

This probe writes both as Triton batched matmuls on the same strided feature-major views, in two forms:
- "triton-ptr": one program per output tile, pointer loads;
- "triton-persistent": one program per SM looping over tiles, TMA tensor descriptors, the tile loop flattened so
  the next tile's loads overlap this tile's epilogue (tl.range(flatten=True)).

Each is checked against PyTorch, then timed (CUDA events, L2 flushed, median) against cuBLAS's bmm on the same views,
alone ("plain") and followed by slimkit's separate pass ("fused": for cuBLAS, bmm + pass). Finally the whole FFN,
forward+backward, with the persistent kernels in place of the two matmuls + passes, against the dense FFN and
slimkit's own. Writes bench/results/structured_ffn_epilogue_probe.{json,md}:

    python bench/structured_ffn_epilogue_probe.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from common import write_results  # noqa: E402
from slimkit.structured.kernels import (_BiasGeluRows, _gelu, _gelu_grad, bias_gelu_rows, gelu_grad_ref,  # noqa: E402
                                        transpose, transpose_colsum)
from structured_ffn_speed import build, events_ms, measure  # noqa: E402

D, T, RATIO = 2048, 16384, 0.25
PTR_CONFIG = (128, 128, 64, 3, 4)          # BM, BN, BK, stages, warps: the best of an 8-config sweep
PERSISTENT_CONFIG = (128, 128, 64, 3, 8)   # the best that fits both kernels' shared memory (128x256 does not)


@triton.jit
def _grouped(t, n_m, n_n, GROUP_M: tl.constexpr):
    per_group = GROUP_M * n_n
    first = (t // per_group) * GROUP_M
    size = tl.minimum(n_m - first, GROUP_M)
    return first + (t % per_group) % size, (t % per_group) // size


@triton.jit
def _epilogue(acc, z, m0, n0, M, N, rm, c_ptr, p_ptr, bias_ptr, sum_ptr, scz, scm, sbias_b, sbias_i, nbias, pid_n,
              MODE: tl.constexpr, APPROX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """MODE 0: C = acc. 1: P = acc + bias[row], C = gelu(P). 2: C = acc * gelu'(P), row sums into sum[pid_n]."""
    rn = n0 + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = z.to(tl.int64) * scz + rm[:, None].to(tl.int64) * scm + rn[None, :]
    if MODE == 1:
        acc += tl.load(bias_ptr + z * sbias_b + rm * sbias_i, mask=rm < M, other=0.0).to(tl.float32)[:, None]
        tl.store(p_ptr + offs, acc.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptr + offs, _gelu(acc, APPROX).to(c_ptr.dtype.element_ty), mask=mask)
    elif MODE == 2:
        d = acc * _gelu_grad(tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32), APPROX)
        tl.store(c_ptr + offs, d.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(sum_ptr + pid_n * nbias + z * sbias_b + rm * sbias_i, tl.sum(tl.where(mask, d, 0.0), axis=1),
                 mask=rm < M)
    else:
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bmm_ptr(a_ptr, b_ptr, c_ptr, p_ptr, bias_ptr, sum_ptr, M, N, K, saz, sam, sak, sbz, sbk, scz, scm,
             sbias_b, sbias_i, nbias, MODE: tl.constexpr, APPROX: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C[z] (M, N) = A[z] (M, K; any strides) @ B[z] (K, N; unit stride along N), z = program_id(1)."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    z = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + z.to(tl.int64) * saz + (rm % M)[:, None].to(tl.int64) * sam + rk[None, :] * sak
    b_ptrs = b_ptr + z.to(tl.int64) * sbz + rk[:, None].to(tl.int64) * sbk + (rn % N)[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        acc = tl.dot(tl.load(a_ptrs, mask=rk[None, :] < K - k * BK, other=0.0),
                     tl.load(b_ptrs, mask=rk[:, None] < K - k * BK, other=0.0), acc)
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    _epilogue(acc, z, pid_m * BM, pid_n * BN, M, N, rm, c_ptr, p_ptr, bias_ptr, sum_ptr, scz, scm, sbias_b, sbias_i,
              nbias, pid_n, MODE, APPROX, BM, BN)


@triton.jit
def _bmm_persistent(a_ptr, b_ptr, c_ptr, p_ptr, bias_ptr, sum_ptr, Z, M, N, K, saz, sa1, sbz, sbk, scz, scm,
                    sbias_b, sbias_i, nbias, A_T: tl.constexpr, MODE: tl.constexpr, APPROX: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NPROG: tl.constexpr,
                    STAGES: tl.constexpr):
    """The same product through TMA descriptors, one program per SM; A is (Z, M, K), or (Z, K, M) with A_T."""
    if A_T:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[Z, K, M], strides=[saz, sa1, 1], block_shape=[1, BK, BM])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[Z, M, K], strides=[saz, sa1, 1], block_shape=[1, BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[Z, K, N], strides=[sbz, sbk, 1], block_shape=[1, BK, BN])
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    per_z = n_m * n_n
    for tile in tl.range(tl.program_id(0), Z * per_z, NPROG, flatten=True, num_stages=STAGES):
        z = tile // per_z
        pid_m, pid_n = _grouped(tile % per_z, n_m, n_n, GROUP_M)
        m0, n0 = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            if A_T:
                a = a_desc.load([z, k * BK, m0]).reshape(BK, BM).T
            else:
                a = a_desc.load([z, m0, k * BK]).reshape(BM, BK)
            acc = tl.dot(a, b_desc.load([z, k * BK, n0]).reshape(BK, BN), acc)
        _epilogue(acc, z, m0, n0, M, N, m0 + tl.arange(0, BM), c_ptr, p_ptr, bias_ptr, sum_ptr, scz, scm, sbias_b,
                  sbias_i, nbias, pid_n, MODE, APPROX, BM, BN)


def _scratch(size: int, align: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _launch_persistent(grid, *args, **kw):
    """The TMA kernel builds its descriptors on the device, in scratch memory from Triton's allocator (a context
    variable, so set in each thread: autograd runs the backward in its own)."""
    triton.set_allocator(_scratch)
    _bmm_persistent[grid](*args, **kw)


def fc1_second(kind: str, w2, h, bias, mode: int = 1):
    """(pre, act) (l*s, T): block j = w2[j] @ rows j, j+l, ... of the feature-major h; its row s is channel s*l + j."""
    (l, s, r), t = w2.shape, h.shape[1]
    pre, act = h.new_empty(l * s, t), h.new_empty(l * s, t)
    bm, bn, bk, stages, warps = PTR_CONFIG if kind == "ptr" else PERSISTENT_CONFIG
    strides = dict(sbz=t, sbk=l * t, scz=t, scm=l * t, sbias_b=1, sbias_i=l, nbias=l * s)
    if kind == "ptr":
        grid = (triton.cdiv(s, bm) * triton.cdiv(t, bn), l)
        _bmm_ptr[grid](w2, h, act, pre, bias, w2, s, t, r, s * r, r, 1, **strides, MODE=mode, APPROX=0, BM=bm, BN=bn,
                       BK=bk, GROUP_M=8, num_stages=stages, num_warps=warps)
    else:
        nprog = torch.cuda.get_device_properties(h.device).multi_processor_count
        _launch_persistent((nprog,), w2, h, act, pre, bias, w2, l, s, t, r, s * r, r, **strides, A_T=False, MODE=mode,
                                  APPROX=0, BM=bm, BN=bn, BK=bk, GROUP_M=8, NPROG=nprog, STAGES=stages,
                                  num_warps=warps)
    return pre, act


def fc2_first_grad(kind: str, w1, dg, pre, mode: int = 2):
    """(dpre, dbias): dpre block b = w1[b]^T @ dg[b] * gelu'(pre[b]) (feature-major), dbias its row sums."""
    (k, q, p), t = w1.shape, dg.shape[1]
    dpre = torch.empty_like(pre)
    bm, bn, bk, stages, warps = PTR_CONFIG if kind == "ptr" else PERSISTENT_CONFIG
    sums = torch.empty(triton.cdiv(t, bn), k * p, device=dg.device, dtype=torch.float32)
    strides = dict(sbz=q * t, sbk=t, scz=p * t, scm=t, sbias_b=p, sbias_i=1, nbias=k * p)
    if kind == "ptr":
        grid = (triton.cdiv(p, bm) * triton.cdiv(t, bn), k)
        _bmm_ptr[grid](w1, dg, dpre, pre, w1, sums, p, t, q, q * p, 1, p, **strides, MODE=mode, APPROX=0, BM=bm,
                       BN=bn, BK=bk, GROUP_M=8, num_stages=stages, num_warps=warps)
    else:
        nprog = torch.cuda.get_device_properties(dg.device).multi_processor_count
        _launch_persistent((nprog,), w1, dg, dpre, pre, w1, sums, k, p, t, q, q * p, p, **strides, A_T=True, MODE=mode,
                                  APPROX=0, BM=bm, BN=bn, BK=bk, GROUP_M=8, NPROG=nprog, STAGES=stages,
                                  num_warps=warps)
    return dpre, sums.sum(0)


class EpilogueFFN(torch.autograd.Function):
    """blockshuffle_ffn's forward and backward with the persistent kernels for fc1's second factor (+ bias + GELU)
    and fc2's first factor's input gradient (+ GELU' + bias gradient); cuBLAS for the other ten matmuls."""

    @staticmethod
    def forward(ctx, x, a1, a2, b1, c1, c2, b2):
        (k1, q1, p1), (k2, q2, p2), (l2, s2, r2) = a1.shape, c1.shape, c2.shape
        t = x.shape[0]
        h = x.new_empty(k1 * q1, t)
        torch.bmm(a1, x.view(t, k1, p1).permute(1, 2, 0), out=h.view(k1, q1, t))
        pre, act = fc1_second("persistent", a2, h, b1)
        g = x.new_empty(k2 * q2, t)
        torch.bmm(c1, act.view(k2, p2, t), out=g.view(k2, q2, t))
        y = x.new_empty(l2 * s2, t)
        torch.bmm(c2, g.view(r2, l2, t).transpose(0, 1), out=y.view(s2, l2, t).transpose(0, 1))
        ctx.save_for_backward(x, a1, a2, c1, c2, h, pre, act, g)
        return transpose(y, b2)

    @staticmethod
    def backward(ctx, dout):
        x, a1, a2, c1, c2, h, pre, act, g = ctx.saved_tensors
        (k1, q1, p1), (l1, s1, r1) = a1.shape, a2.shape
        (k2, q2, p2), (l2, s2, r2) = c1.shape, c2.shape
        dy, db2 = transpose_colsum(dout.contiguous())
        t = dy.shape[1]
        dyv = dy.view(s2, l2, t).transpose(0, 1)
        dc2 = torch.bmm(dyv, g.view(r2, l2, t).transpose(0, 1).transpose(1, 2))
        dg = x.new_empty(k2 * q2, t)
        torch.bmm(c2.transpose(1, 2), dyv, out=dg.view(r2, l2, t).transpose(0, 1))
        dc1 = torch.bmm(dg.view(k2, q2, t), act.view(k2, p2, t).transpose(1, 2))
        dpre, db1 = fc2_first_grad("persistent", c1, dg, pre)
        dprev = dpre.view(s1, l1, t).transpose(0, 1)
        da2 = torch.bmm(dprev, h.view(r1, l1, t).transpose(0, 1).transpose(1, 2))
        dh = x.new_empty(k1 * q1, t)
        torch.bmm(a2.transpose(1, 2), dprev, out=dh.view(r1, l1, t).transpose(0, 1))
        dhb = dh.view(k1, q1, t)
        da1 = torch.bmm(dhb, x.view(t, k1, p1).permute(1, 2, 0).transpose(1, 2))
        dx = x.new_empty(t, k1 * p1)
        torch.bmm(dhb.transpose(1, 2), a1, out=dx.view(t, k1, p1).transpose(0, 1))
        return dx, da1, da2, db1.to(dout.dtype), dc1, dc2, db2


class EpilogueModule(torch.nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.fc1, self.fc2 = ffn.fc1, ffn.fc2

    def forward(self, x):
        f1, f2 = self.fc1, self.fc2
        return EpilogueFFN.apply(x.contiguous(), f1.w1, f1.w2, f1.bias, f2.w1, f2.w2, f2.bias)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("structured_ffn_epilogue_probe: needs a CUDA GPU (Hopper or newer for the TMA kernel)")
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    ffn, _ = build("blockshuffle", D, RATIO, dev, dt)
    a2, c1 = ffn.fc1.w2.detach(), ffn.fc2.w1.detach()
    (l, s, r), (k, q, p) = a2.shape, c1.shape
    h = torch.randn(r * l, T, device=dev, dtype=dt)
    b1 = torch.randn(l * s, device=dev, dtype=dt)
    dg = torch.randn(k * q, T, device=dev, dtype=dt)
    pre0 = torch.randn(k * p, T, device=dev, dtype=dt)

    def cublas_fc1(gelu: bool = True):
        y = h.new_empty(l * s, T)
        torch.bmm(a2, h.view(r, l, T).transpose(0, 1), out=y.view(s, l, T).transpose(0, 1))
        return bias_gelu_rows(y, b1) if gelu else y

    def cublas_fc2_grad(gelu: bool = True):
        y = dg.new_empty(k * p, T)
        torch.bmm(c1.transpose(1, 2), dg.view(k, q, T), out=y.view(k, p, T))
        if not gelu:
            return y
        ctx = type("Ctx", (), {"saved_tensors": (pre0, torch.zeros_like(b1[:k * p])), "approximate": "none"})()
        return _BiasGeluRows.backward(ctx, y)[0]

    act_ref = F.gelu(cublas_fc1(False).float() + b1.float()[:, None])
    dpre_ref = cublas_fc2_grad(False).float() * gelu_grad_ref(pre0.float())
    dbias_ref = dpre_ref.sum(1)
    setting = f"r={RATIO} d={D} T={T}"
    rows = []

    def row(method, what, metric, value, ms=None):
        rows.append({"model": "ffn-middle", "method": method, "setting": f"{what} {setting}", "metric": metric,
                     "value": round(value, 4), **({} if ms is None else {"ms": round(ms, 4)})})

    timer = events_ms
    for what, cub, ours in (("fc1-second+gelu", cublas_fc1, lambda kd, m: fc1_second(kd, a2, h, b1, m)),
                            ("fc2-first-grad+gelu'", cublas_fc2_grad, lambda kd, m: fc2_first_grad(kd, c1, dg, pre0, m))):
        cub_plain, cub_fused = timer(lambda: cub(False), dev, 100), timer(cub, dev, 100)
        row("cublas", what, "plain_ms", cub_plain, cub_plain)
        row("cublas", what, "fused_ms", cub_fused, cub_fused)
        mode = 1 if what.startswith("fc1") else 2
        for kind in ("ptr", "persistent"):
            out = ours(kind, mode)
            err = rel(out[1], act_ref) if mode == 1 else max(rel(out[0], dpre_ref), rel(out[1], dbias_ref))
            row(f"triton-{kind}", what, "rel_err", err)
            plain, fused = timer(lambda: ours(kind, 0), dev, 100), timer(lambda: ours(kind, mode), dev, 100)
            row(f"triton-{kind}", what, "plain_ms", plain, plain)
            row(f"triton-{kind}", what, "fused_ms", fused, fused)
            print(f"{what:22s} {kind:10s} plain {plain:.3f} fused {fused:.3f} (cuBLAS {cub_plain:.3f} / "
                  f"{cub_fused:.3f}) err {err:.1e}", flush=True)

    # the whole FFN, forward+backward (biases random so that their gradients are checked)
    with torch.no_grad():
        ffn.fc1.bias.normal_()
        ffn.fc2.bias.normal_()
    x = torch.randn(T, D, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(T, D, device=dev, dtype=dt)
    ref = build("blockshuffle", D, RATIO, dev, torch.float32)[0]
    ref.load_state_dict({n: v.float() for n, v in ffn.state_dict().items()})
    xr = x.detach().float().requires_grad_(True)
    ref(xr).backward(gy.float())
    EpilogueModule(ffn)(x).backward(gy)
    err = max([rel(x.grad, xr.grad)] + [rel(a.grad, b.grad) for a, b in zip(ffn.parameters(), ref.parameters())])
    ffn.zero_grad(set_to_none=True)
    dense, _ = build("dense", D, RATIO, dev, dt)
    xx = torch.randn(T, D, device=dev, dtype=dt)
    times = {}
    for name, m in (("dense", dense), ("blockshuffle", ffn), ("blockshuffle-epilogue", EpilogueModule(ffn))) * 2:
        times[name] = min(times.get(name, float("inf")), measure(m, xx, 50, timer=timer)["fwbw_ms"])
    for name, ms in times.items():
        rows.append({"model": "ffn", "method": name, "setting": setting, "metric": "fwbw_speedup",
                     "value": round(times["dense"] / ms, 3), "ms": round(ms, 4)})
    row("blockshuffle-epilogue", "ffn grads vs fp32", "rel_err", err)
    print("  ".join(f"{n} {ms:.3f} ms ({times['dense'] / ms:.2f}x)" for n, ms in times.items()), f"grad err {err:.1e}")
    notes = [
        "Timing: CUDA events around each call, L2 flushed before it, median of 100 calls (50 for the FFN, best of "
        "two interleaved passes). 'plain_ms': the matmul alone; 'fused_ms': for cuBLAS its bmm followed by slimkit's "
        "separate pass (bias_gelu_rows forward / backward), for Triton the one kernel with the epilogue.",
        f"Tile configs: pointer {PTR_CONFIG}, persistent {PERSISTENT_CONFIG} (BM, BN, BK, stages, warps), the best of "
        "sweeps run while writing this probe; 128x256 tiles do not fit the GELU' kernel's shared memory.",
    ]
    write_results("structured_ffn_epilogue_probe", "cuda", rows, notes,
                  columns=("model", "method", "setting", "metric", "value", "ms"))


if __name__ == "__main__":
    main()
