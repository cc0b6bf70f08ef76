"""Quads from triangles: a quad-dominant mesh for editing, without touching a vertex or a UV.

glTF stores triangles only, so quads travel as pairs of triangles (:func:`quad_pairs`; a
job asked for ``topology: "quad"`` returns them as ``quads.json`` beside the GLB, and makes
twice the face budget in triangles so that the pairs land at the budget). Two triangles
across a UV seam never pair (their corners are different vertices), so the texture stays
as it was baked; the add-on joins the same pairs in Blender, the CLI writes them to OBJ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def quad_pairs(vertices: np.ndarray, faces: np.ndarray, max_bend_deg: float = 40.0,
               max_corner_deg: float = 160.0) -> np.ndarray:
    """Which triangles [F,3] (indices into ``vertices``) to join in pairs across their shared
    edges into quads: [Q,2] triangle indices, each triangle in one pair at most.

    Greedy, best pairs first, then re-paired along short alternating paths so that few
    triangles are left. A pair is scored by how far its quad's corners are from right angles
    and by the bend between its two triangles; pairs that bend more than ``max_bend_deg`` or
    would make a corner above ``max_corner_deg`` (nearly degenerate, or concave) are never
    made. Blender's own Tris to Quads (bmesh join_triangles, greedy only) was measured too: 136
    quads of 184 faces on a 320-triangle unwrapped icosphere where this makes 156 of 164.

    UV seams bound it: triangles on either side of one never pair. On a generated mesh of
    2828 triangles (draft), 0.70 of the triangles end in quads (0.84 even at 90 degrees of
    bend); pairing before the unwrap, with the unwrapper keeping pairs in one chart, would
    lift that.

    Written here rather than taken from MeshLab: its smart pairing also re-triangulates (on
    a 320-face test mesh, 10 of its 160 quads were not two of the input triangles), and a
    quad must cover exactly the two triangles the texture was baked on."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64).reshape(-1, 3)
    if len(f) == 0:
        return np.zeros((0, 2), np.int64)
    # directed edges (a -> b) of each triangle; a neighbour across the edge has (b -> a)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    tri = np.tile(np.arange(len(f)), 3)
    opp = np.concatenate([f[:, 2], f[:, 0], f[:, 1]])  # the corner facing each edge
    key = {(int(a), int(b)): i for i, (a, b) in enumerate(e)}
    cand = []
    for i, (a, b) in enumerate(e):
        j = key.get((int(b), int(a)))
        if j is None or j < i or tri[i] == tri[j]:
            continue
        cand.append((i, j))
    if not cand:
        return np.zeros((0, 2), np.int64)
    c = np.array(cand)
    a, b = e[c[:, 0], 0], e[c[:, 0], 1]
    p, q = opp[c[:, 0]], opp[c[:, 1]]
    quad = np.stack([a, q, b, p], 1)  # a -> q -> b -> p keeps triangle (a, b, p)'s winding
    pts = v[quad]
    n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)
    n1 = n(np.cross(v[b] - v[a], v[p] - v[a]))
    n2 = n(np.cross(v[a] - v[b], v[q] - v[b]))
    bend = np.degrees(np.arccos(np.clip((n1 * n2).sum(1), -1, 1)))
    prev, nxt = np.roll(pts, 1, axis=1), np.roll(pts, -1, axis=1)
    cos = (n(prev - pts) * n(nxt - pts)).sum(-1)
    corners = np.degrees(np.arccos(np.clip(cos, -1, 1)))  # [C,4]
    # a convex quad's corners turn the same way as its normal
    turn = np.einsum("cij,cj->ci", np.cross(pts - prev, nxt - pts), n(n1 + n2))
    ok = (bend <= max_bend_deg) & (corners.max(1) <= max_corner_deg) & (turn > 0).all(1)
    score = np.abs(corners - 90.0).sum(1) + bend
    t1s, t2s = tri[c[:, 0]], tri[c[:, 1]]
    mate = np.full(len(f), -1)  # the candidate pair each triangle is in
    adj: dict[int, list[int]] = {}
    for k in np.argsort(score, kind="stable"):
        if not ok[k]:
            continue
        t1, t2 = int(t1s[k]), int(t2s[k])
        adj.setdefault(t1, []).append(k)
        adj.setdefault(t2, []).append(k)
        if mate[t1] < 0 and mate[t2] < 0:
            mate[t1] = mate[t2] = k
    other = lambda k, t: int(t2s[k]) if int(t1s[k]) == t else int(t1s[k])
    # a greedy matching strands triangles between pairs: re-pair along alternating paths
    # t -- u == w -- x ... (== paired) that end at a lone triangle, up to ``depth`` pairs long
    def augment(t: int, depth: int, seen: set) -> bool:
        for k in adj.get(t, ()):
            u = other(k, t)
            if u in seen:
                continue
            if mate[u] < 0:
                mate[t] = mate[u] = k
                return True
            w = other(int(mate[u]), u)
            if depth == 0 or w in seen:
                continue
            seen.update((u, w))
            if augment(w, depth - 1, seen):
                mate[t] = mate[u] = k
                return True
        return False

    for depth in (1, 2, 4):
        for t in np.flatnonzero(mate < 0):
            if mate[t] < 0 and int(t) in adj:
                augment(int(t), depth, {int(t)})
    ks = sorted({int(k) for k in mate[mate >= 0]})
    return np.stack([t1s[ks], t2s[ks]], 1).astype(np.int64) if ks else np.zeros((0, 2), np.int64)


def polygons(faces: np.ndarray, pairs: np.ndarray) -> list[np.ndarray]:
    """The polygons of triangles [F,3] joined by ``pairs`` [Q,2] (from :func:`quad_pairs`, or
    read from a job's ``quads.json``): each pair's quad in the winding of its triangles (the
    corner of the second triangle that the first lacks goes between the shared edge's two
    corners), then the triangles left, in order. A pair that does not share an edge with
    matching direction is refused (ValueError): it is not a pair of these triangles."""
    f = np.asarray(faces, np.int64).reshape(-1, 3)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(f) or len(np.unique(pairs)) != pairs.size):
        raise ValueError("quad pairs must name distinct triangles of the mesh, each once")
    out = []
    for t1, t2 in pairs:
        a1, b1 = f[t1], f[t2]
        for r in range(3):
            a, b, p = a1[r], a1[(r + 1) % 3], a1[(r + 2) % 3]  # edge a -> b of t1, p opposite
            rest = [x for x in b1 if x not in (a, b)]
            if len(rest) == 1 and any(b1[s] == b and b1[(s + 1) % 3] == a for s in range(3)):
                out.append(np.array([a, rest[0], b, p], np.int64))
                break
        else:
            raise ValueError(f"triangles {t1} and {t2} share no edge")
    used = np.zeros(len(f), bool)
    used[pairs.reshape(-1)] = True
    out.extend(f[~used])
    return out


@dataclass
class QuadFit:
    """A mesh decimated and unwrapped so that its triangles, paired, land at a polygon budget."""

    vertices: np.ndarray  # the welded mesh (before the unwrap's seam splits)
    faces: np.ndarray
    normals: np.ndarray
    vmap: np.ndarray  # the unwrap (:func:`backend.mesh.uv.unwrap`)
    uv_faces: np.ndarray
    uv: np.ndarray
    pairs: np.ndarray  # [Q,2] into uv_faces
    passes: int  # decimate-and-unwrap passes after the first unwrap

    @property
    def polygons(self) -> int:
        return int(len(self.uv_faces) - len(self.pairs))


def fit_quad_budget(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, budget: int,
                    texture_size: int = 1024, tolerance: float = 0.03, max_passes: int = 3) -> QuadFit:
    """Decimate a mesh (made with more triangles than ``budget``: twice it holds the budget even
    when every triangle pairs) until its triangles, unwrapped and paired, make ``budget``
    polygons within ``tolerance``.

    How many triangles pair is only known after the unwrap, since a seam stops pairs: 0.70 of
    them on a 2.8k-triangle generated mesh, 0.85-0.95 on smoother or denser ones. So: unwrap,
    pair, decimate to ``budget / (1 - paired / 2)`` triangles, and again from the measured
    ratio, each pass one quadric decimation and one unwrap (about 1-4 s at 2k-20k triangles).
    Only decimates: a pass that lands below the budget (past the tolerance) is followed by one
    from the last mesh above it, at the triangle count where the two passes' polygons cross the
    budget; the closest pass is kept."""
    from .clean import CleanSettings, clean_mesh
    from .uv import unwrap

    v, f, n = np.asarray(vertices), np.asarray(faces), np.asarray(normals)
    best = None
    above = None  # the last pass over the budget: its mesh, triangles and polygons
    made = 1.0  # triangles the last decimation made per triangle asked (clean-up can undershoot: 649 for 697)
    for k in range(max_passes + 1):
        vmap, uf, uv = unwrap(v, f, texture_size, normals=n)
        pairs = quad_pairs(v[vmap], uf)
        fit = QuadFit(v, f, n, vmap, uf, uv, pairs, k)
        if best is None or abs(fit.polygons - budget) < abs(best.polygons - budget):
            best = fit
        if abs(fit.polygons - budget) <= tolerance * budget or k == max_passes:
            break
        if fit.polygons > budget:
            above = ((v, f, n), len(uf), fit.polygons)
            source = (v, f, n)
            target = int(round(len(uf) * budget / max(fit.polygons, 1)))  # the same ratio at a few % fewer triangles
        elif above is None:
            break  # under the budget from the start: nothing to decimate toward it
        else:
            source, tri, poly = above
            target = int(round(len(uf) + (budget - fit.polygons) * (tri - len(uf)) / max(poly - fit.polygons, 1)))
        ask = int(round(target / made))
        if ask >= len(source[1]):
            break
        settings = CleanSettings(target_faces=ask, min_component_fraction=0.0, smoothing_steps=0, fill_budget=0.0)
        v, f, n = clean_mesh(source[0], source[1], settings)
        made = len(f) / max(ask, 1)
    return best
