"""The Triton kernels behind ``relpos_attention`` (imported only where Triton is installed).

``relpos_flash_fwd`` (global blocks, grid width a power of two): one program per block of
``BLOCK_M`` queries and one (batch, head); the loop runs over the ``GH`` key rows, each a block of
``GW`` keys, so the row term ``eh`` is one value per query and block and the column term ``ew`` one
tile loaded once. Logits are taken to base 2 (``exp2``), the running maximum and sum kept in fp32
(online softmax), ``p`` cast to the value dtype for the second product.

``relpos_tile_fwd`` (small grids of any shape, e.g. SAM's 14 x 14 windows): all ``GH * GW`` keys fit
one tile of ``NP`` (the next power of two), so there is no loop and the softmax is exact in one
pass. A key's row and column are not contiguous blocks here, so the terms enter as two small matrix
products with one-hots built in registers, ``eh @ onehot(row(j))`` and ``ew @ onehot(col(j))``
(``RP`` = the grid side padded to a power of two, at least 16): no mask in memory, and the terms
are added in fp32. Padded keys get ``-inf``; padded queries are not stored.
"""
import triton
import triton.language as tl


@triton.jit
def relpos_flash_fwd(Q, K, V, EH, EW, O, qk_scale,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                     sehb, sehh, sehn, sehr, sewb, sewh, sewn, sewc,
                     HEADS: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr, D: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    b = z // HEADS
    h = z % HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, GW)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :])
    ew = tl.load(EW + b * sewb + h * sewh + offs_m[:, None] * sewn + offs_c[None, :] * sewc).to(tl.float32)
    ew = ew * 1.4426950408889634
    eh_ptr = EH + b * sehb + h * sehh + offs_m * sehn
    k_ptr = K + b * skb + h * skh + offs_c[None, :] * skn + offs_d[:, None]
    v_ptr = V + b * svb + h * svh + offs_c[:, None] * svn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for r in range(0, GH):
        k = tl.load(k_ptr + r * GW * skn)
        v = tl.load(v_ptr + r * GW * svn)
        eh = tl.load(eh_ptr + r * sehr).to(tl.float32) * 1.4426950408889634
        s = tl.dot(q, k) * qk_scale + ew + eh[:, None]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def relpos_tile_fwd(Q, K, V, EH, EW, O, qk_scale,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                    sehb, sehh, sehn, sehr, sewb, sewh, sewn, sewc,
                    HEADS: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr, D: tl.constexpr,
                    NP: tl.constexpr, RP: tl.constexpr, BLOCK_M: tl.constexpr):
    z = tl.program_id(0)  # (window, head) on the first axis: batch x 25 windows x heads exceeds 65535 at
    pid_m = tl.program_id(1)  # batch 219 on ViT-B, over CUDA's limit for the other axes
    b = z // HEADS
    h = z % HEADS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, NP)
    offs_d = tl.arange(0, D)
    offs_r = tl.arange(0, RP)
    rows = offs_m < GH * GW
    keys = offs_n < GH * GW
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=rows[:, None], other=0.0)
    k = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None], mask=keys[None, :], other=0.0)
    eh = tl.load(EH + b * sehb + h * sehh + offs_m[:, None] * sehn + offs_r[None, :] * sehr,
                 mask=rows[:, None] & (offs_r[None, :] < GH), other=0.0)
    ew = tl.load(EW + b * sewb + h * sewh + offs_m[:, None] * sewn + offs_r[None, :] * sewc,
                 mask=rows[:, None] & (offs_r[None, :] < GW), other=0.0)
    onehot_row = tl.where(offs_r[:, None] == (offs_n // GW)[None, :], 1.0, 0.0).to(q.dtype)
    onehot_col = tl.where(offs_r[:, None] == (offs_n % GW)[None, :], 1.0, 0.0).to(q.dtype)
    # one fp32 logits tile: the terms accumulate onto the scaled q k^T (natural log), then to base 2
    s = tl.dot(q, k) * (qk_scale * 0.6931471805599453)
    s = tl.dot(ew.to(q.dtype), onehot_col, tl.dot(eh.to(q.dtype), onehot_row, s)) * 1.4426950408889634
    s = tl.where(keys[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.math.exp2(s - m[:, None])
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=keys[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v) / tl.sum(p, 1)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=rows[:, None])
