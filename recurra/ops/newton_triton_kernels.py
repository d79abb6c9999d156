"""Triton kernels of :mod:`recurra.ops.newton_triton` (this module imports triton; import it
only through that module). Kernels must live at module level for ``triton.jit``."""

import triton
import triton.language as tl


@triton.jit
def combine(a_left, b_left, a_right, b_right):
    # (a_right, b_right) after (a_left, b_left): h -> a_r (a_l h + b_l) + b_r
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def last_row(x, t, last):
    return tl.sum(tl.where((t == last)[:, None], x, 0.0), axis=0)


@triton.jit
def scan_kernel(a_ptr, b_ptr, h0_ptr, out_ptr, steps, width,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < width
    carry = tl.load(h0_ptr + pid_b * width + d, mask=dm, other=0.0)
    base = pid_b * steps * width
    for t0 in range(0, steps, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = (t < steps)[:, None] & dm[None, :]
        offs = base + t[:, None] * width + d[None, :]
        a = tl.load(a_ptr + offs, mask=m, other=1.0)
        b = tl.load(b_ptr + offs, mask=m, other=0.0)
        coef, acc = tl.associative_scan((a, b), 0, combine)
        h = coef * carry[None, :] + acc
        tl.store(out_ptr + offs, h, mask=m)
        carry = last_row(h, t, tl.minimum(t0 + BLOCK_T, steps) - 1)


@triton.jit
def paragru_step_kernel(u_ptr, su_b, su_t, su_g, su_d, h0_ptr, h_ptr, mask_ptr,
                        az_ptr, ar_ptr, ah_ptr, out_ptr, steps, width,
                        HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < width
    a_z = tl.load(az_ptr + d, mask=dm, other=0.0)[None, :]
    a_r = tl.load(ar_ptr + d, mask=dm, other=0.0)[None, :]
    a_h = tl.load(ah_ptr + d, mask=dm, other=0.0)[None, :]
    h0 = tl.load(h0_ptr + pid_b * width + d, mask=dm, other=0.0)
    carry = h0
    base = pid_b * steps * width
    for t0 in range(0, steps, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = (t < steps)[:, None] & dm[None, :]
        offs = base + t[:, None] * width + d[None, :]
        # previous state of the current iterate: h[t - 1], or h0 at t = 0
        prev = tl.load(h_ptr + offs - width, mask=m & (t > 0)[:, None], other=0.0)
        hp = tl.where((t == 0)[:, None], h0[None, :], prev)
        u_offs = pid_b * su_b + t[:, None] * su_t + d[None, :] * su_d
        u_z = tl.load(u_ptr + u_offs, mask=m, other=0.0)
        u_r = tl.load(u_ptr + u_offs + su_g, mask=m, other=0.0)
        u_h = tl.load(u_ptr + u_offs + 2 * su_g, mask=m, other=0.0)
        z = tl.sigmoid(a_z * hp + u_z)
        r = tl.sigmoid(a_r * hp + u_r)
        c = 2.0 * tl.sigmoid(2.0 * (a_h * (hp * r) + u_h)) - 1.0  # tanh
        f = hp + z * (c - hp)
        jac = ((1.0 - z) + (c - hp) * a_z * z * (1.0 - z)
               + z * (1.0 - c * c) * a_h * (r + hp * a_r * r * (1.0 - r)))
        if HAS_MASK:
            keep = tl.load(mask_ptr + pid_b * steps + t, mask=t < steps, other=0) != 0
            f = tl.where(keep[:, None], f, hp)
            jac = tl.where(keep[:, None], jac, 1.0)
        jac = tl.where(m, jac, 1.0)
        rhs = tl.where(m, f - jac * hp, 0.0)
        coef, acc = tl.associative_scan((jac, rhs), 0, combine)
        h = coef * carry[None, :] + acc
        tl.store(out_ptr + offs, h, mask=m)
        carry = last_row(h, t, tl.minimum(t0 + BLOCK_T, steps) - 1)
