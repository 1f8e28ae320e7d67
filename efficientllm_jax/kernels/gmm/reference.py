"""Pure-jnp grouped matmul: one dense matmul per group over a row mask, the definition the kernel is tested against.

Rows of x are sorted by group: group e owns rows [offset_e, offset_e + group_sizes[e]) with offset_e the sum of the
sizes before it; rows past sum(group_sizes) belong to no group and give zero outputs (as jax.lax.ragged_dot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes_e, num_rows: int):
  """[M] group id of every row (num_groups for rows past the last group)."""
  ends_e = jnp.cumsum(group_sizes_e)
  return jnp.searchsorted(ends_e, jnp.arange(num_rows), side="right")


def gmm(x_mk, w_ekn, group_sizes_e, transpose_rhs: bool = False):
  """y[m] = x[m] @ w[group(m)] (or @ w[group(m)].T), accumulated in fp32, returned in x's dtype."""
  g_m = row_groups(group_sizes_e, x_mk.shape[0])
  prec = jax.lax.Precision.HIGHEST
  y = None
  for e in range(w_ekn.shape[0]):
    w = w_ekn[e].T if transpose_rhs else w_ekn[e]
    y_e = jnp.dot(x_mk, w, preferred_element_type=jnp.float32, precision=prec)
    y_e = jnp.where((g_m == e)[:, None], y_e, 0.0)
    y = y_e if y is None else y + y_e
  return y.astype(x_mk.dtype)


def tgmm(x_mk, dy_mn, group_sizes_e, num_groups: int):
  """Transposed grouped matmul: out[e] = x_e^T @ dy_e over group e's rows -> [E, K, N] (zero for empty groups)."""
  g_m = row_groups(group_sizes_e, x_mk.shape[0])
  prec = jax.lax.Precision.HIGHEST
  outs = []
  for e in range(num_groups):
    x_e = jnp.where((g_m == e)[:, None], x_mk, 0)
    outs.append(jnp.dot(x_e.T, dy_mn, preferred_element_type=jnp.float32, precision=prec))
  return jnp.stack(outs).astype(x_mk.dtype)
