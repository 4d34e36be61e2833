"""Energy flow polynomials (Komiske, Metodiev, Thaler 2018) of degree <= 4, computed natively.

An EFP of a multigraph G with vertices V and edges E is, for one jet,

    EFP_G = sum_{i_1..i_|V|} prod_{v in V} z_{i_v} prod_{(a, b) in E} theta_{i_a i_b},

with energyflow's hadronic measure ``'hadr'``: ``z_i = pT_i`` (``normed=None`` as the jetnet package
uses it, i.e. unnormalised) and ``theta_ij = (d_eta^2 + d_phi^2)^(beta/2)`` with ``d_phi`` wrapped.
Disconnected graphs are products of their connected ("prime") components.

:data:`CATALOGUE` lists every EFP of degree d <= 4 (36 graphs) in energyflow's order (checked
against energyflow 1.4.0's ``EFPSet(('d<=', 4))``), so columns line up with
``jetnet.utils.efps``. :func:`select` applies energyflow-style selections such as
``[("n==", 4), ("d==", 4), ("p==", 1)]``. Connected graphs are evaluated by variable elimination
in JAX (batched, jitted, float32; trees in O(N^2) per jet, cycles in O(N^3)), jets in chunks.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

MAX_DEGREE = 4

# Connected multigraphs of degree <= 4 as edge lists, in energyflow's order.
_PRIME_EDGES = (
    (),
    ((0, 1),),
    ((0, 1), (0, 1)),
    ((0, 1), (0, 1), (0, 1)),
    ((0, 1), (0, 1), (0, 1), (0, 1)),
    ((0, 1), (0, 2)),
    ((0, 1), (0, 2), (0, 2)),
    ((0, 1), (0, 2), (0, 2), (0, 2)),
    ((0, 1), (0, 1), (0, 2), (0, 2)),
    ((0, 1), (0, 2), (1, 2)),
    ((0, 1), (0, 2), (0, 2), (1, 2)),
    ((0, 1), (0, 2), (0, 3)),
    ((0, 1), (0, 2), (0, 2), (0, 3)),
    ((0, 1), (0, 2), (1, 3)),
    ((0, 1), (0, 2), (0, 2), (1, 3)),
    ((0, 1), (0, 1), (0, 2), (1, 3)),
    ((0, 1), (0, 2), (1, 2), (0, 3)),
    ((0, 1), (0, 2), (1, 3), (2, 3)),
    ((0, 1), (0, 2), (0, 3), (0, 4)),
    ((0, 1), (0, 2), (0, 3), (1, 4)),
    ((0, 1), (0, 2), (1, 3), (2, 4)),
)
# Disconnected ones as products of the connected graphs above (indices), in energyflow's order.
_COMPOSITES = (
    (1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (2, 5), (1, 6), (1, 9), (1, 1, 1), (1, 11), (1, 13), (5, 5),
    (1, 1, 2), (1, 1, 5), (1, 1, 1, 1),
)


@dataclasses.dataclass(frozen=True)
class Graph:
    """One EFP: its edge list, prime factors (indices of connected graphs) and energyflow's specs."""

    edges: tuple[tuple[int, int], ...]
    factors: tuple[int, ...]
    n: int  # vertices
    e: int  # distinct edges
    d: int  # degree (edges with multiplicity)
    v: int  # maximum valency
    c: int  # chromatic number
    p: int  # number of prime factors
    h: int  # number of vertices of valency 1


def _chromatic_number(n, edges):
    simple = {tuple(sorted(edge)) for edge in edges}
    for colours in range(1, n + 1):
        for assignment in itertools.product(range(colours), repeat=n):
            if all(assignment[a] != assignment[b] for a, b in simple):
                return colours
    return n


def _graph(edges, factors):
    n = 1 + max((max(edge) for edge in edges), default=0)
    valency = np.zeros(n, int)
    for a, b in edges:
        valency[a] += 1
        valency[b] += 1
    return Graph(
        edges=tuple(edges), factors=tuple(factors), n=n, e=len(set(edges)), d=len(edges),
        v=int(valency.max(initial=0)), c=_chromatic_number(n, edges) if edges else 1, p=len(factors),
        h=int(np.sum(valency == 1)),
    )


def _join(factors):
    edges, offset = [], 0
    for index in factors:
        part = _PRIME_EDGES[index]
        edges += [(a + offset, b + offset) for a, b in part]
        offset += 1 + max(max(edge) for edge in part)
    return edges


CATALOGUE: tuple[Graph, ...] = tuple(
    [_graph(edges, (i,)) for i, edges in enumerate(_PRIME_EDGES)]
    + [_graph(_join(factors), factors) for factors in _COMPOSITES]
)

_OPS = {"==": operator.eq, "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
        "!=": operator.ne}


def _parse(arg):
    if isinstance(arg, (int, np.integer)) and not isinstance(arg, bool):
        return "d", "<=", int(arg)
    if isinstance(arg, str):
        for op in ("==", "<=", ">=", "!=", "<", ">"):
            if op in arg:
                name, value = arg.split(op)
                return name.strip(), op, int(value)
    if isinstance(arg, (tuple, list)) and len(arg) == 2 and isinstance(arg[0], str):
        spec = arg[0].strip()
        for op in ("==", "<=", ">=", "!=", "<", ">"):
            if spec.endswith(op):
                return spec[: -len(op)].strip(), op, int(arg[1])
    raise ValueError(f"cannot read the EFP selection {arg!r}; use e.g. ('d<=', 4), ('n==', 4), ('p==', 1) or 4")


def select(*efpset_args) -> list[int]:
    """Indices into :data:`CATALOGUE` of the EFPs an energyflow ``EFPSet(*efpset_args)`` holds.

    Selections combine with AND over the fields n, e, d, v, c, p, h. The degree must be bounded
    by at most 4 (``('d<=', 4)``, ``('d==', 3)``, ...): fpcd's catalogue stops there.
    """
    criteria = [_parse(arg) for arg in efpset_args]
    for name, _, _ in criteria:
        if name not in ("n", "e", "d", "v", "c", "p", "h"):
            raise ValueError(f"unknown EFP selection field {name!r}; expected one of n, e, d, v, c, p, h")
    bounded = any(name == "d" and op in ("==", "<=", "<") and (value - (op == "<")) <= MAX_DEGREE
                  for name, op, value in criteria)
    if not bounded:
        raise ValueError(f"fpcd computes EFPs up to degree {MAX_DEGREE}: bound the degree, e.g. ('d<=', 4); "
                         f"got {list(efpset_args)}")
    return [i for i, g in enumerate(CATALOGUE)
            if all(_OPS[op](getattr(g, name), value) for name, op, value in criteria)]


def _connected_efp(edges, z, theta_power):
    """One connected EFP by variable elimination: leaves are summed into their neighbours
    (``f_u *= theta^m f_leaf``, O(B N^2)); what remains is one vertex, one edge, a triangle or a
    4-cycle, each closed with at most two batched matrix products (O(B N^3))."""
    multiplicity = {}
    for a, b in edges:
        key = (min(a, b), max(a, b))
        multiplicity[key] = multiplicity.get(key, 0) + 1
    n = 1 + max((max(edge) for edge in edges), default=0)
    factor = {v: z for v in range(n)}

    def neighbours(v):
        return [(u if w == v else w, m) for (u, w), m in multiplicity.items() if v in (u, w)]

    def power(m):
        return theta_power[m]

    while True:
        leaves = [v for v in factor if len(neighbours(v)) == 1 and len(factor) > 2]
        if not leaves:
            break
        leaf = leaves[0]
        (u, m), = neighbours(leaf)
        factor[u] = factor[u] * jnp.einsum("bij,bj->bi", power(m), factor[leaf])
        del multiplicity[(min(leaf, u), max(leaf, u))]
        del factor[leaf]
    vertices = sorted(factor)
    if len(vertices) == 1:
        return factor[vertices[0]].sum(axis=1)
    if len(vertices) == 2:
        a, b = vertices
        return jnp.einsum("bi,bij,bj->b", factor[a], power(multiplicity[(a, b)]), factor[b])

    def path(a, mid, c):  # sum over the middle vertex: (theta^m1 diag(f_mid) theta^m2)_ac
        m1 = multiplicity[(min(a, mid), max(a, mid))]
        m2 = multiplicity[(min(mid, c), max(mid, c))]
        return jnp.einsum("bij,bj,bjk->bik", power(m1), factor[mid], power(m2))

    if len(vertices) == 3:
        a, b, c = vertices
        direct = power(multiplicity[(a, b)])
        return jnp.einsum("bi,bj,bij,bij->b", factor[a], factor[b], direct, path(a, c, b))
    if len(vertices) == 4:
        a = vertices[0]
        b, d = [u for u, _ in neighbours(a)]
        (c,) = [v for v in vertices if v not in (a, b, d)]
        return jnp.einsum("bi,bj,bij,bij->b", factor[a], factor[c], path(a, b, c), path(a, d, c))
    raise NotImplementedError(f"no elimination plan for the graph {edges}")


@partial(jax.jit, static_argnames=("prime_indices", "beta"))
def _prime_efps(pt, eta, phi, *, prime_indices, beta):
    """Connected EFPs ``(B, len(prime_indices))`` of jets given as ``pt, eta, phi (B, N)``."""
    d_eta = eta[:, :, None] - eta[:, None, :]
    d_phi = jnp.pi - jnp.abs(jnp.abs(phi[:, :, None] - phi[:, None, :]) - jnp.pi)
    theta = (d_eta**2 + d_phi**2) ** (0.5 * beta)
    theta_power = {1: theta}
    for m in range(2, MAX_DEGREE + 1):
        theta_power[m] = theta_power[m - 1] * theta
    return jnp.stack([_connected_efp(_PRIME_EDGES[i], pt, theta_power) for i in prime_indices], axis=1)


def compute(pt, eta, phi, indices, *, beta: float = 1.0, chunk_size: int = 4096) -> np.ndarray:
    """EFPs ``(B, len(indices))`` (float64 array from float32 arithmetic) of jets ``pt, eta, phi (B, N)``.

    Zero-pT entries (padding) contribute nothing.
    """
    indices = list(indices)
    primes = tuple(sorted({f for i in indices for f in CATALOGUE[i].factors}))
    column = {p: k for k, p in enumerate(primes)}
    pt, eta, phi = (np.asarray(a, np.float32) for a in (pt, eta, phi))
    pieces = []
    for start in range(0, pt.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        size = pt[sl].shape[0]
        pad = chunk_size - size if pt.shape[0] > chunk_size else 0  # one compiled shape for every chunk
        args = [np.pad(a[sl], ((0, pad), (0, 0))) for a in (pt, eta, phi)]
        pieces.append(np.asarray(_prime_efps(*args, prime_indices=primes, beta=float(beta)), np.float64)[:size])
    prime_values = np.concatenate(pieces) if pieces else np.zeros((0, len(primes)))
    out = np.ones((pt.shape[0], len(indices)))
    for k, i in enumerate(indices):
        for factor in CATALOGUE[i].factors:
            out[:, k] *= prime_values[:, column[factor]]
    return out
