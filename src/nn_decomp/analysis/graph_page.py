"""One circuit-tracer attribution graph as an offline page: the SVG is drawn here, in Python, and the
page loads nothing (circuit-tracer's own viewer fetches d3 from the internet and stays blank offline).

circuit-tracer 0.5.0's `utils.create_graph_files(graph, slug, out, node_threshold, edge_threshold)`
prunes a graph and writes `<out>/<slug>.json` (pydantic `frontend.graph_models.Model`). Read here:

- `metadata`: `prompt_tokens` (one decoded string per position: the x axis), `prompt`, `slug`, `scan`.
- `nodes[]`: `node_id` (what links name; a feature's is "{layer}_{latent}_{position}", the only place
  its latent is: `feature` is the Cantor pairing of layer and latent), `feature_type` ("embedding",
  "mlp reconstruction error", "logit", else a feature: 0.5.0 writes "cross layer transcoder" for
  per-layer transcoders too), `layer` (a string: "E" for embeddings, the model layer for features and
  errors, n_layers + 1 for logits), `ctx_idx` (the position; logits all sit at the last one), `clerp`
  (a logit's 'Output "tok" (p=0.123)'; a feature's label, often empty) and, where set, `activation`,
  `influence`, `token_prob`.
- `links[]`: `source`, `target` (node_ids), `weight` (the signed attribution).
"""
import html
import json
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from nn_decomp.runtime.files import write_atomic

ROW_H, NODE_W, MIN_COL_W, LEFT, TOP = 80, 34, 60, 70, 30
KINDS = {"embedding": "embedding", "mlp reconstruction error": "error", "logit": "logit"}
FILL = {"embedding": "#9ae6b4", "error": "#cbd5e0", "logit": "#fbd38d", "feature": "#90cdf4"}
POSITIVE, NEGATIVE = "#2b6cb0", "#c53030"
CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}.meta{color:#555;font-size:.9em}
svg text{font-size:9px;fill:#222;white-space:pre}.node>circle,.node>rect{stroke:#333;stroke-width:.8}
.node{cursor:pointer}.axis{fill:#555;font-size:11px}.link.dim{stroke-opacity:.03}"""
# hovering a node leaves only its own links drawn strongly
SCRIPT = """const links = [...document.querySelectorAll(".link")];
for (const n of document.querySelectorAll(".node")) {
  const other = l => l.dataset.s !== n.dataset.id && l.dataset.t !== n.dataset.id;
  n.onmouseenter = () => links.forEach(l => l.classList.toggle("dim", other(l)));
  n.onmouseleave = () => links.forEach(l => l.classList.remove("dim"));
}"""


def kind(node: dict) -> str:
    return KINDS.get(node["feature_type"], "feature")


def latent(node: dict) -> int:
    return int(node["node_id"].split("_")[1])


def row_key(node: dict) -> int:
    """Embeddings below layer 0; logits are already above the last layer (theirs is n_layers + 1)."""
    return -1 if node["layer"] == "E" else int(node["layer"])


class Layout(NamedTuple):
    xy: dict[str, tuple[float, float]]  # node_id → where it is drawn
    raised: set[str]  # node_ids labelled above: every other node of a cell, so neighbours' labels do not overlap
    centers: list[float]  # x of each prompt position's column
    rows: list[int]  # row keys, bottom up


def layout(nodes: list[dict], n_pos: int) -> Layout:
    """A column per position, as wide as its fullest (row, position) cell, whose nodes stand side by
    side; a row per layer in use."""
    cells = defaultdict(list)
    for node in nodes:
        cells[row_key(node), node["ctx_idx"]].append(node["node_id"])
    widths = [MIN_COL_W] * n_pos
    for (_, pos), members in cells.items():
        widths[pos] = max(widths[pos], (len(members) + 1) * NODE_W)
    centers = [LEFT + sum(widths[:pos]) + widths[pos] / 2 for pos in range(n_pos)]
    rows = sorted({key for key, _ in cells})
    xy = {}
    for (key, pos), members in cells.items():
        y = TOP + (len(rows) - 1 - rows.index(key)) * ROW_H
        xy |= {node_id: (centers[pos] + (i - (len(members) - 1) / 2) * NODE_W, y) for i, node_id in enumerate(members)}
    return Layout(xy, {node_id for members in cells.values() for node_id in members[1::2]}, centers, rows)


def shown(token: str) -> str:
    return token.replace("\n", "⏎")


def label(node: dict, tokens: list[str]) -> str:
    k = kind(node)
    if k == "feature":
        return f"{node['layer']}/{latent(node)}"
    if k == "logit":  # the token out of 'Output "tok" (p=0.123)'
        return node["clerp"].removeprefix("Output ").rsplit(" (p=", 1)[0]
    return shown(tokens[node["ctx_idx"]]) if k == "embedding" else "err"


def details(node: dict, tokens: list[str]) -> str:
    what = f"latent {latent(node)}" if kind(node) == "feature" else node["feature_type"]
    lines = [f"{what}, layer {node['layer']}, position {node['ctx_idx']} {tokens[node['ctx_idx']]!r}", node["clerp"]]
    lines += [f"{name} {node[name]:.4g}" for name in ("activation", "influence", "token_prob") if node.get(name)]
    return "\n".join(line for line in lines if line)


def dashboard_href(node: dict, dashboard: str | None, clt_latents: int | None) -> str | None:
    """A feature's place in the lab's dashboard: interp anchors it as `feature-<id>`, id = source index ×
    n_latents + latent; a CLT exported for circuit-tracer has its sources at layers 0..L−1, a transcoder one."""
    if dashboard is None or kind(node) != "feature":
        return None
    layer = int(node["layer"])
    feature_id = latent(node) if clt_latents is None else layer * clt_latents + latent(node)
    return f"{dashboard.format(layer=layer)}#feature-{feature_id}"


def node_svg(node: dict, x: float, y: float, tokens: list[str], href: str | None, raised: bool) -> str:
    k, esc = kind(node), html.escape
    shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="8"/>' if k == "feature" else
             f'<rect x="{x - 8:.1f}" y="{y - 8:.1f}" width="16" height="16"/>')
    text_y = y - 12 if raised else y + 19
    g = (f'<g class="node {k}" data-id="{esc(node["node_id"])}" fill="{FILL[k]}">'
         f"<title>{esc(details(node, tokens))}</title>{shape}"
         f'<text x="{x:.1f}" y="{text_y:.1f}" text-anchor="middle">{esc(label(node, tokens))}</text></g>')
    return f'<a href="{esc(href)}">{g}</a>' if href else g


def link_svg(link: dict, xy: dict, scale: float) -> str:
    (x1, y1), (x2, y2), share = xy[link["source"]], xy[link["target"]], abs(link["weight"]) / scale
    return (f'<line class="link" data-s="{html.escape(link["source"])}" data-t="{html.escape(link["target"])}" '
            f'x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{POSITIVE if link["weight"] > 0 else NEGATIVE}" stroke-width="{0.5 + 3.5 * share:.2f}" '
            f'stroke-opacity="{0.15 + 0.7 * share:.2f}"><title>{html.escape(link["source"])} → '
            f'{html.escape(link["target"])}: {link["weight"]:.4g}</title></line>')


def row_name(node: dict) -> str:
    return {"embedding": "embed", "logit": "logit"}.get(kind(node), f"layer {node['layer']}")


def axes_svg(centers: list[float], rows: list[int], names: dict[int, str], tokens: list[str]) -> str:
    """Row names down the left, the prompt's tokens under the embeddings."""
    ys = [TOP + (len(rows) - 1 - i) * ROW_H for i in range(len(rows))]
    out = [f'<text class="axis" x="6" y="{y + 4:.1f}">{html.escape(names[key])}</text>' for key, y in zip(rows, ys)]
    bottom = ys[0] + 42
    out += [f'<text class="axis token" x="{x:.1f}" y="{bottom:.1f}" transform="rotate(20 {x:.1f} {bottom:.1f})">'
            f'{html.escape(shown(token))}</text>' for x, token in zip(centers, tokens)]
    return "".join(out)


def graph_page(graph: dict, dashboard: str | None = None, *, clt_latents: int | None = None) -> str:
    """The HTML page of one pruned graph. `dashboard`: href of the lab's feature dashboard, with
    `{layer}` for a per-layer set (one dashboard per layer); for a CLT's one dashboard over every
    layer pass `clt_latents` (its n_latents), as that dashboard numbers features across layers."""
    meta, nodes, links = graph["metadata"], graph["nodes"], graph["links"]
    tokens = meta["prompt_tokens"]
    xy, raised, centers, rows = layout(nodes, len(tokens))
    scale = max((abs(link["weight"]) for link in links), default=1.0)
    drawn_nodes = "".join(node_svg(node, *xy[node["node_id"]], tokens, dashboard_href(node, dashboard, clt_latents),
                                   node["node_id"] in raised) for node in nodes)
    width, height = max(centers) + MIN_COL_W, TOP + len(rows) * ROW_H + 40
    svg = (f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
           f'{axes_svg(centers, rows, {row_key(n): row_name(n) for n in nodes}, tokens)}'
           f'<g class="links">{"".join(link_svg(link, xy, scale) for link in links)}</g>'
           f'<g class="nodes">{drawn_nodes}</g></svg>')
    esc = html.escape
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(meta["slug"])}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(meta['slug'])}</h1><p>{esc(meta['prompt'])}</p>"
            f'<p class="meta">{esc(meta["scan"])} · {len(nodes)} nodes · {len(links)} links · circles are '
            f"features, squares embeddings, errors (grey) and logits; blue links excite, red inhibit</p>"
            f"{svg}<script>{SCRIPT}</script></body></html>")


def write_graph_page(graph_json: Path, out: Path, dashboard: str | None = None, *,
                     clt_latents: int | None = None) -> Path:
    """`out`: the page of the graph circuit-tracer wrote at `graph_json` (see `graph_page`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, graph_page(json.loads(Path(graph_json).read_text()), dashboard, clt_latents=clt_latents))
    return out
