"""Mesh from the config, logical-axis rules, and the one activation-sharding helper.

Parameters carry logical axis names (vocab, embed, heads, ...); activations are constrained with names of their
own (batch, length, act_embed, act_heads, ...). `config.sharding_rules` maps each logical name to mesh axes
(`data`, `fsdp`, `tensor`, `expert`), as MaxText's logical_axis_rules table does. A dimension whose size the
mesh axes do not divide is replicated instead (logged once), so e.g. MQA's single K/V head simply stays whole
under tensor parallelism.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from efficientllm_jax import jax_setup  # noqa: F401 - JAX / Flax settings before anything compiles
from efficientllm_jax.parallel.axes import DEFAULT_RULES, MESH_AXES  # noqa: F401 (re-exported)

_logged: set[str] = set()


def mesh_shape(shape_cfg: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for MESH_AXES; one -1 takes the devices left over. Raises ValueError with a one-line fix."""
  sizes = [int(shape_cfg.get(a, 1)) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh.shape has -1 on {', '.join(MESH_AXES[i] for i in free)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} has a size < 1: use positive sizes or one -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh.shape fixes {fixed} devices per group, which does not divide the {num_devices} devices: "
                       "change mesh.shape")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are present: make the product match or set one axis to -1")
  return tuple(sizes)


def make_mesh(cfg, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(dict(cfg.mesh.shape), len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_of(cfg) -> dict[str, Any]:
  return {name: (tuple(axes) if isinstance(axes, list) else axes) for name, axes in cfg.sharding_rules}


def mesh_axes(entry) -> tuple[str, ...]:
  """Mesh axes of a rules value or a PartitionSpec entry: None, one axis name, or a sequence of them."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, Any]) -> P:
  """PartitionSpec for one array: each logical name -> mesh axes, skipping axes already used, size-1 axes, and
  axes whose product does not divide the dimension."""
  if names is None:
    return P()
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = mesh_axes(rules.get(name) if name is not None else None)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes):
      msg = f"sharding: dim {name}={dim} not divisible by mesh axes {axes}; replicated"
      if msg not in _logged:
        _logged.add(msg)
        logging.info(msg)
      axes = ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def param_shardings(abstract_state, mesh: Mesh, rules: dict[str, Any]):
  """NamedShardings for an nnx.State of Variables (or their abstract values) from their `sharding_names`."""
  def one(v):
    names = getattr(v, "sharding_names", None)
    return NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def like_params(tree, params_treedef, shardings_of_params, mesh: Mesh):
  """Shardings for an optimizer state: subtrees shaped like the params reuse their shardings, the rest is
  replicated (step counters, schedules)."""
  replicated = NamedSharding(mesh, P())

  def is_param_tree(x):
    try:
      return jax.tree.structure(x) == params_treedef
    except Exception:  # noqa: BLE001 - any non-pytree leaf simply is not a params tree
      return False

  return jax.tree.map(lambda x: shardings_of_params if is_param_tree(x) else replicated, tree,
                      is_leaf=is_param_tree)


# --- activation constraints --------------------------------------------------------------------------------

_ACTIVE: list[tuple[Mesh, dict[str, Any]]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, Any]):
  """Within this context (entered around tracing), `shard(x, names)` constrains activations on `mesh`."""
  _ACTIVE.append((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.pop()


def active_mesh() -> tuple[Mesh, dict[str, Any]] | None:
  """(mesh, rules) of the innermost activation_sharding context (code that picks a shard_map path), or None."""
  return _ACTIVE[-1] if _ACTIVE else None


def active_devices() -> int:
  """How many devices the innermost activation_sharding context's mesh holds (1 with none): the `auto` choices
  keep a kernel off meshes of several devices until it has run there."""
  return _ACTIVE[-1][0].size if _ACTIVE else 1


def shard(x, names: Sequence[str | None]):
  """Constrain activation `x` to the mesh axes its logical `names` map to; identity with no active mesh."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  if math.prod(mesh.devices.shape) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def batch_axes() -> tuple[Mesh | None, tuple[str, ...]]:
  """The active mesh and the mesh axes (of size > 1) the batch dimension is split over; (None, ()) when there is
  no active mesh or the batch is not split (code that runs per device under shard_map then needs none)."""
  ctx = active_mesh()
  if ctx is None:
    return None, ()
  mesh, rules = ctx
  axes = tuple(a for a in mesh_axes(rules.get("batch")) if mesh.shape[a] > 1)
  return (mesh, axes) if axes else (None, ())


def batch_sharding(mesh: Mesh, rules: dict[str, Any], shape: Sequence[int]) -> NamedSharding:
  """Batches are [grad_accum, batch, ...]: the batch dimension over the data-like axes."""
  names = (None, "batch") + (None,) * (len(shape) - 2)
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def mesh_sizes(cfg) -> dict[str, int]:
  """{mesh axis: devices} of cfg.mesh.shape on the visible devices (the -1 axis resolved)."""
  return dict(zip(MESH_AXES, mesh_shape(dict(cfg.mesh.shape), jax.device_count())))


def data_parallel_size(cfg) -> int:
  """Devices the batch dimension is split over (for the divisibility check in validate)."""
  sizes = mesh_sizes(cfg)
  return math.prod(sizes[a] for a in mesh_axes(rules_of(cfg).get("batch")))
