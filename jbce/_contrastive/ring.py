r"""The contrastive losses across devices: the column blocks travel a ring of ``ppermute``\ s.

With the batch sharded over ``n`` devices on a mesh axis, device ``k`` holds ``x_k`` and ``y_k``
(``[b, D]``, ``b = B / n``). Its rows of the similarity matrix need every ``y``: the ``y``
blocks (and their ids) move one device along the ring per step, ``n - 1`` steps, and at
step ``s`` device ``k`` computes the block of ``x_k`` against ``y_{k-s}`` with the tile walk
of :mod:`jbce._contrastive.chunked_xla`. Nothing of size ``B`` exists on any device: per
device ``O(b (D + chunk))``, whatever ``n``.

- Rows stay home: their running statistics (CLIP) or sums (SigLIP) are merged step by step.
- Columns (CLIP's column softmax) travel with their block: each device merges its part into
  the block's running statistics; after the last step they are one device short of home,
  and one last ``ppermute`` of ``3 b`` floats brings them there.
- Backward: the same ring recomputes every tile; ``d x`` accumulates at home, ``d y``
  travels with its block (in float32) and goes home by one last ``ppermute``; each block
  also carries what its columns need (CLIP: shift, log-sum-exp and their cotangents).

Overlap: in each step the ``ppermute`` of the next step's block is issued before the tiles
are computed and does not depend on them, so XLA may run the transfer during the step. The
travelling accumulators are received at the start of a step and merged only after the tiles
(computed from a fresh start), so their transfer overlaps the tiles too; nothing in a step
waits on a transfer before its matmuls. On the first step there is nothing to receive, on
the last nothing to send onwards: these two steps are written out beside a loop over the
others, so every transfer moves something used.
"""

from __future__ import annotations

import jax
from jax import lax

from jbce._contrastive import chunked_xla
from jbce._contrastive.chunked_xla import LOSSES, Config


def _ring(cfg: Config, step, carry):
    """Runs ``step(carry, first, last)`` for the ``n`` steps of the ring (the first and the
    last written out, the others in a loop). Returns the last carry."""
    n = lax.axis_size(cfg.axis_name)
    carry = step(carry, True, n == 1)
    if n > 2:
        carry = lax.fori_loop(1, n - 1, lambda _, c: step(c, False, False), carry)
    if n > 1:
        carry = step(carry, False, True)
    return carry


def _next_device(cfg: Config):
    """Sends a pytree to the next device of the ring (device k to k + 1)."""
    n = lax.axis_size(cfg.axis_name)
    perm = [(k, (k + 1) % n) for k in range(n)]
    return lambda tree: jax.tree.map(lambda a: lax.ppermute(a, cfg.axis_name, perm), tree)


def forward(cfg: Config, x, y, ids, params):
    """The statistics of ``x``'s rows and (CLIP) ``y``'s columns of the global matrix."""
    loss = LOSSES[cfg.loss]
    send = _next_device(cfg)
    empty_rows, empty_cols = chunked_xla.empty(cfg, x.shape[0], (x, y, ids, *params))

    def step(carry, first, last):
        y_here, ids_here, rows, cols_done = carry
        # In flight during this step's tiles: the next step's block, and the column
        # statistics of this step's block from the devices it has visited.
        y_next, ids_next = (y_here, ids_here) if last else send((y_here, ids_here))
        cols_in = None if first or cols_done is None else send(cols_done)
        rows, cols = chunked_xla.forward_block(
            cfg, x, y_here, ids, ids_here, params, rows, empty_cols
        )
        if cols_in is not None:
            cols = loss.merge(cols_in, cols)
        return y_next, ids_next, rows, cols

    _, _, rows, cols = _ring(cfg, step, (y, ids, empty_rows, empty_cols))
    if not loss.columns:
        return rows
    # The last block is the next device's own: its finished column statistics go home.
    return rows, (send(cols) if lax.axis_size(cfg.axis_name) > 1 else cols)


def backward(cfg: Config, x, y, ids, params, row_res, col_res):
    """(d x, d y, d params) of the global loss for this device's ``x`` and ``y``."""
    send = _next_device(cfg)

    def step(carry, first, last):
        y_here, ids_here, col_here, dx, dps, dy_done = carry
        block = (y_here, ids_here, col_here)
        y_next, ids_next, col_next = block if last else send(block)
        dy_in = None if first else send(dy_done)  # this block's d y from earlier devices
        ddx, ddy, ddps = chunked_xla.backward_block(
            cfg, x, y_here, ids, ids_here, params, row_res, col_here
        )
        if first:  # d x, d params and d y start here (nothing received, nothing to add)
            return y_next, ids_next, col_next, ddx, ddps, ddy
        dps = tuple(a + b for a, b in zip(dps, ddps, strict=True))
        return y_next, ids_next, col_next, dx + ddx, dps, dy_in + ddy

    _, _, _, dx, dps, dy = _ring(cfg, step, (y, ids, col_res, None, None, None))
    return dx, (send(dy) if lax.axis_size(cfg.axis_name) > 1 else dy), dps


similarity_stats = chunked_xla.stats_core(forward, backward)
