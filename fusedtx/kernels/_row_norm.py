"""@triton.jit pieces the row normalisations share (fusedtx/kernels/layer_norm.py, rms_norm.py):
the backward's dx and weight-gradient partials, and the partials' column sums.

CENTERED selects LayerNorm's formulas (xhat = (x - mean) * rstd; dx = (g - (xhat * mean_gx +
mean_g)) * rstd; a bias gradient) or RMSNorm's (xhat = x * rstd; dx = (g - xhat * mean_gx) *
rstd), reference.layer_norm_backward / rms_norm_backward operation for operation.

`bwd_rows`: one program per row group (reference.row_group_sum: groups of R = ceil(rows /
groups) consecutive rows, policy.ROW_GROUPS groups). It walks its rows in ascending order,
writes each row's dx, and adds dy * xhat (and dy) into its own float32 partial row of a
(groups, N) buffer: kept in registers and written once when the row fits a block, else
read-modify-written block by block (only this program touches that row, so the order is
fixed). Without parameter gradients it runs one program per row. `sum_row_groups` then adds a
block of columns' partial rows in ascending group order from +0.
"""
import triton
import triton.language as tl

from ._common import fold_lanes, round_to_bf16


@triton.jit
def _xhat(x, mean, rstd, CENTERED: tl.constexpr):
    if CENTERED:
        xhat = (x - mean) * rstd
    else:
        xhat = x * rstd
    return xhat


@triton.jit
def _dx(g, xhat, mean_g, mean_gx, rstd, CENTERED: tl.constexpr):
    if CENTERED:
        dx = (g - (xhat * mean_gx + mean_g)) * rstd
    else:
        dx = (g - xhat * mean_gx) * rstd
    return dx


@triton.jit
def _bwd_block(x_row, dy_row, W, start, cols, n_cols, mean, rstd, HAS_WEIGHT: tl.constexpr, CENTERED: tl.constexpr):
    """One block of a wide row for the backward's two passes: (inside, dy, xhat, g)."""
    inside = start + cols < n_cols
    x = tl.load(x_row + start + cols, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_row + start + cols, mask=inside, other=0.0).to(tl.float32)
    xhat = _xhat(x, mean, rstd, CENTERED)
    if HAS_WEIGHT:
        g = dy * tl.load(W + start + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        g = dy
    return inside, dy, xhat, g


@triton.jit
def _mean_of(Mean, row, CENTERED: tl.constexpr):
    if CENTERED:
        mean = tl.load(Mean + row)
    else:
        mean = 0.0
    return mean


@triton.jit
def bwd_rows(DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial, n_rows, n_cols, rows_per_program,
             CENTERED: tl.constexpr, HAS_WEIGHT: tl.constexpr, PARAM_GRADS: tl.constexpr, LOOPED: tl.constexpr,
             BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The backward of this program's row group (module docstring). Mean and DB_partial are
    read and written only when CENTERED."""
    group = tl.program_id(0).to(tl.int64)
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # This program's own partial rows: nobody else reads or writes them until sum_row_groups.
    dw_part = DW_partial + group * n_cols
    db_part = DB_partial + group * n_cols
    cols = tl.arange(0, BLOCK)
    n = tl.cast(n_cols, tl.float32)
    if not LOOPED:
        inside = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), tl.float32)  # the group's partials start at +0
        db = tl.zeros((BLOCK,), tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
            mean = _mean_of(Mean, row, CENTERED)
            rstd = tl.load(Rstd + row)
            xhat = _xhat(x, mean, rstd, CENTERED)
            if HAS_WEIGHT:
                g = dy * w
            else:
                g = dy
            # Past the end xhat = -mean * rstd (or 0 * rstd, NaN for rstd = inf), not 0: mask the
            # products, not just the loads.
            mean_g = 0.0
            if CENTERED:
                mean_g = tl.math.div_rn(fold_lanes(0.0 + tl.where(inside, g, 0.0), LOG2_BLOCK), n)
            mean_gx = tl.math.div_rn(fold_lanes(0.0 + tl.where(inside, g * xhat, 0.0), LOG2_BLOCK), n)
            dx = _dx(g, xhat, mean_g, mean_gx, rstd, CENTERED)
            if ROUND_BF16:
                dx = round_to_bf16(dx)
            tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=inside)
            if PARAM_GRADS:
                dw = dw + dy * xhat
                if CENTERED:
                    db = db + dy
        if PARAM_GRADS:
            tl.store(dw_part + cols, dw, mask=inside)
            if CENTERED:
                tl.store(db_part + cols, db, mask=inside)
    else:
        for row in range(row_start, row_end):
            x_row = X + row * n_cols
            dy_row = DY + row * n_cols
            mean = _mean_of(Mean, row, CENTERED)
            rstd = tl.load(Rstd + row)
            # The group's first row reads no partials (other=+0): the buffer needs no zeroing.
            n_seen = tl.where(row > row_start, n_cols, 0)
            acc_g = tl.zeros((BLOCK,), tl.float32)
            acc_gx = tl.zeros((BLOCK,), tl.float32)
            for start in range(0, n_cols, BLOCK):
                inside, dy, xhat, g = _bwd_block(x_row, dy_row, W, start, cols, n_cols, mean, rstd, HAS_WEIGHT,
                                                 CENTERED)
                if CENTERED:
                    acc_g = acc_g + tl.where(inside, g, 0.0)
                acc_gx = acc_gx + tl.where(inside, g * xhat, 0.0)
            mean_g = 0.0
            if CENTERED:
                mean_g = tl.math.div_rn(fold_lanes(acc_g, LOG2_BLOCK), n)
            mean_gx = tl.math.div_rn(fold_lanes(acc_gx, LOG2_BLOCK), n)
            for start in range(0, n_cols, BLOCK):
                inside, dy, xhat, g = _bwd_block(x_row, dy_row, W, start, cols, n_cols, mean, rstd, HAS_WEIGHT,
                                                 CENTERED)
                dx = _dx(g, xhat, mean_g, mean_gx, rstd, CENTERED)
                if ROUND_BF16:
                    dx = round_to_bf16(dx)
                tl.store(DX + row * n_cols + start + cols, dx.to(DX.dtype.element_ty), mask=inside)
                if PARAM_GRADS:
                    seen = start + cols < n_seen
                    dw = tl.load(dw_part + start + cols, mask=seen, other=0.0)
                    tl.store(dw_part + start + cols, dw + dy * xhat, mask=inside)
                    if CENTERED:
                        db = tl.load(db_part + start + cols, mask=seen, other=0.0)
                        tl.store(db_part + start + cols, db + dy, mask=inside)
            if PARAM_GRADS:
                # The next row re-reads these partials: make every thread's stores visible to
                # every other thread of the program, whatever layouts the compiler picked.
                tl.debug_barrier()


@triton.jit
def sum_row_groups(partial, n_groups, n_cols, inside, BLOCK_N: tl.constexpr):
    """reference.row_group_sum's last step for a block of columns: `partial` points at them in
    group 0's partial row; the n_groups rows are added in ascending order from +0."""
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for _ in range(0, n_groups):
        acc = acc + tl.load(partial, mask=inside, other=0.0)
        partial += n_cols  # pointers advance by whole rows: 64-bit, no int overflow
    return acc


def plan_groups(rows: int, groups: int, need_param_grads: bool) -> tuple[int, int]:
    """(rows per program, programs) of bwd_rows: the non-empty row groups (an empty group's
    partial is +0, and adding +0 to a sum that started at +0 never changes it, so the result is
    the reference's group sum exactly), or one row per program without parameter gradients."""
    if not need_param_grads:
        return 1, rows
    rows_per_program = -(-rows // groups)
    return rows_per_program, -(-rows // rows_per_program)
