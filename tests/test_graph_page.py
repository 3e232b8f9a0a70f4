"""The offline graph page on a graph in circuit-tracer 0.5.0's exact JSON format (as
`frontend.graph_models.Node`'s constructors and `create_graph_files` write it): every node and link
is drawn where it belongs, features link to the lab's dashboards, and Chromium with no network draws it."""
import json
import re

import numpy as np

from browser import dump_dom, screenshot
from nn_decomp.analysis.graph_page import FILL, graph_page, layout, write_graph_page

TOKENS = ["<s>", " cat", " sat", "\n"]
N_LAYERS = 3


def node(node_id: str, feature: int, layer: str, pos: int, feature_type: str, js_id: str, **fields) -> dict:
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": feature_type,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id,
            "clerp": "", "influence": None, "activation": None} | fields


def feature(layer: int, pos: int, latent: int) -> dict:
    cantor = (layer + latent) * (layer + latent + 1) // 2 + latent
    return node(f"{layer}_{latent}_{pos}", cantor, str(layer), pos, "cross layer transcoder", f"{layer}_{latent}-0",
                influence=0.5, activation=2.5)


def logit(vocab: int, token: str, prob: float) -> dict:
    return node(f"{N_LAYERS + 1}_{vocab}_3", vocab, str(N_LAYERS + 1), 3, "logit", f"L_{vocab}-3", token_prob=prob,
                is_target_logit=prob > 0.5, clerp=f'Output "{token}" (p={prob:.3f})')


def graph() -> dict:
    embeddings = [node(f"E_{100 + pos}_{pos}", pos, "E", pos, "embedding", f"E_{100 + pos}-{pos}", influence=0.1)
                  for pos in range(len(TOKENS))]
    features = [feature(0, 1, 5), feature(0, 2, 7), feature(2, 3, 5), feature(2, 3, 11)]
    error = node("0_1_3", -1, "1", 3, "mlp reconstruction error", "1_3-0", influence=0.3)
    logits = [logit(900, " mat", 0.6), logit(901, "<floor>", 0.2)]
    ids = lambda nodes: [n["node_id"] for n in nodes]  # noqa: E731
    e, f, r, (mat, floor) = ids(embeddings), ids(features), error["node_id"], ids(logits)
    links = [(e[1], f[0], 1.5), (e[2], f[1], -0.7), (f[0], f[2], 0.9), (f[1], f[3], 0.4), (r, f[2], -0.2),
             (f[2], mat, 2.0), (f[3], floor, -1.1), (e[3], r, 0.3)]
    return {"metadata": {"slug": "cat-sat", "scan": "nn-decomp-test", "transcoder_list": [], "prompt_tokens": TOKENS,
                         "prompt": "<s> cat sat\n", "node_threshold": 0.8, "schema_version": 1},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": embeddings + features + [error] + logits,
            "links": [{"source": s, "target": t, "weight": w} for s, t, w in links]}


def test_layout_puts_positions_left_to_right_and_layers_bottom_up():
    g = graph()
    xy, raised, centers, rows = layout(g["nodes"], len(TOKENS))
    assert rows == [-1, 0, 1, 2, N_LAYERS + 1] and centers == sorted(centers)
    (x_e0, y_emb), (x_e3, _) = xy["E_100_0"], xy["E_103_3"]
    assert x_e0 == centers[0] and x_e3 == centers[3]
    assert y_emb > xy["0_5_1"][1] > xy["0_1_3"][1] > xy["2_5_3"][1] > xy["4_900_3"][1]  # svg y grows downwards
    (x5, y5), (x11, y11) = xy["2_5_3"], xy["2_11_3"]
    assert y5 == y11 and x11 - x5 > 16 and (x5 + x11) / 2 == centers[3]  # one cell, side by side
    assert raised == {"2_11_3", "4_901_3"}  # the second of each two-node cell is labelled above


def test_page_draws_every_node_and_link_escaped_and_loads_nothing():
    g = graph()
    page = graph_page(g, "dash/layer{layer}/dashboard.html")
    assert page.count('<g class="node ') == len(g["nodes"]) and page.count('<line class="link"') == len(g["links"])
    assert page.count('<g class="node feature"') == 4 and page.count('<g class="node error"') == 1
    assert page.count('stroke="#c53030"') == 3  # the inhibitory links
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs == ["dash/layer0/dashboard.html#feature-5", "dash/layer0/dashboard.html#feature-7",
                     "dash/layer2/dashboard.html#feature-5", "dash/layer2/dashboard.html#feature-11"]
    assert not re.search(r"(src|href)=\S*//", page) and "<script src" not in page and "url(" not in page
    assert "&lt;s&gt;" in page and "<s>" not in page and "&quot;&lt;floor&gt;&quot;" in page and "⏎" in page
    assert "latent 11, layer 2, position 3 &#x27;\\n&#x27;\nactivation 2.5\ninfluence 0.5" in page


def test_page_of_a_clt_links_to_its_one_dashboard():
    page = graph_page(graph(), "clt/dashboard.html", clt_latents=64)
    assert re.findall(r'href="([^"]*)"', page)[2:] == ["clt/dashboard.html#feature-133",
                                                       "clt/dashboard.html#feature-139"]  # 2 · 64 + latent
    assert "href" not in graph_page(graph())


def test_page_renders_offline_in_chromium(tmp_path):
    (tmp_path / "cat-sat.json").write_text(json.dumps(graph(), indent=2))
    page = write_graph_page(tmp_path / "cat-sat.json", tmp_path / "graphs" / "cat-sat.html", "dash.html")
    dom = dump_dom(page)
    assert dom.count('class="node ') == len(graph()["nodes"]) and dom.count('class="link"') == len(graph()["links"])
    assert all(f">{token}</text>" in dom for token in ["&lt;s&gt;", " cat", " sat", "⏎"])
    pixels = screenshot(page, tmp_path / "graph.png")[..., :3]
    for kind, count in {"embedding": 4, "feature": 4, "error": 1, "logit": 2}.items():
        fill = np.array([int(FILL[kind][i:i + 2], 16) / 255 for i in (1, 3, 5)])
        painted = (np.abs(pixels - fill).max(-1) < 0.02).sum()  # a node's inside: ~150 px circle, ~200 px square
        assert painted > 100 * count, f"{kind} nodes are not painted ({painted} px of their colour)"
