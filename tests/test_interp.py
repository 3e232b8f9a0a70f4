"""Interpretability reports on a tiny LM: the scan matches a brute-force reference, the offline
judge's explanation and intruder pick, ablations are causal, the dashboard is self-contained."""
import json
import math

import pytest
import torch

from helpers import make_coder, one_thread  # noqa: F401  (fixture)
from nn_decomp.data.text import token_contexts
from nn_decomp.analysis.interp import (Example, InterpConfig, OfflineJudge, OpenAIJudge, ablation_effect, ablation_kl,
                              analyse, feature_acts, render, scan, write_report)
from nn_decomp.dictionaries import HookedDictionary

TEXT = ("The committee met on Monday to discuss the budget. Members argued about taxes, schools and roads, "
        "and the chairman promised a vote before the end of the month. ") * 3


def dictionary(arch="transcoder", d_model=32) -> HookedDictionary:
    coder = make_coder(arch, "topk", d_in=d_model, d_out=d_model, n_latents=64, k=4).eval()
    layers = [0, 1, 2] if arch == "clt" else [1]
    return HookedDictionary(coder, [f"blocks.{i}.ln2.hook_normalized" for i in layers],
                            [f"blocks.{i}.hook_mlp_out" for i in layers], layers, "tiny")


@pytest.fixture
def contexts(tiny_lm):
    docs = [TEXT.replace("budget", word) for word in ("budget", "harbor", "election", "railway", "garden", "army")]
    return torch.stack(list(token_contexts(docs, tiny_lm.tokenizer, 24)))


def exclude(tokenizer):
    return [tokenizer.bos_token_id, tokenizer.eos_token_id]


@pytest.mark.parametrize("arch", ["transcoder", "clt"])
def test_scan_matches_brute_force(arch, tiny_lm, contexts, one_thread):
    d = dictionary(arch)
    s = scan(tiny_lm, d, contexts, exclude(tiny_lm.tokenizer), n_examples=3, batch_contexts=4)
    acts_CTX = feature_acts(tiny_lm, d, contexts)
    keep_CT = ~torch.isin(contexts, torch.tensor(exclude(tiny_lm.tokenizer)))
    acts_CTX = acts_CTX * keep_CT[..., None]
    assert s.n_tokens == int(keep_CT.sum())
    torch.testing.assert_close(s.fires, (acts_CTX > 0).sum((0, 1)))
    best_CX = acts_CTX.amax(1)
    torch.testing.assert_close(s.top_values, best_CX.topk(3, dim=0).values)
    # Each listed context really reaches the listed value.
    torch.testing.assert_close(best_CX.gather(0, s.top_contexts), s.top_values)


def example(text: str, active: set[str]) -> Example:
    tokens = text.split(" ")
    return Example(0, tokens, [1.0 if t in active else 0.0 for t in tokens])


def test_offline_judge_explains_by_active_tokens_and_finds_the_odd_example():
    judge = OfflineJudge(n_tokens=2)
    shown = [example("the tax on bread", {"tax"}), example("a tax cut now", {"tax", "cut"}),
             example("no new tax today", {"tax"})]
    assert judge.explain(shown) == 'fires on "tax", "cut"'
    trial = shown + [example("purple whales sing loudly", set())]
    trial = [trial[1], trial[3], trial[0], trial[2]]
    assert judge.pick_intruder(trial) == 1
    assert "<<tax>>" in render(shown[0], True) and "<<" not in render(shown[0], False)


def test_openai_judge_posts_a_chat_request_and_parses_the_answer(monkeypatch):
    """No network: urlopen is replaced; checks the request and the parsing."""
    sent = []

    class Response:
        def __init__(self, text):
            self.text = text

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, *a):
            return json.dumps({"choices": [{"message": {"content": self.text}}]}).encode()

    def fake_urlopen(request, timeout):
        sent.append((request.full_url, request.headers, json.loads(request.data)))
        return Response("3" if "belong" in json.loads(request.data)["messages"][0]["content"] else "taxes")

    judge = OpenAIJudge("http://judge.invalid/v1/", "m", api_key_env="NN_DECOMP_TEST_KEY")
    monkeypatch.delenv("NN_DECOMP_TEST_KEY", raising=False)
    with pytest.raises(RuntimeError, match="NN_DECOMP_TEST_KEY"):
        judge.explain([example("a tax", {"tax"})])
    monkeypatch.setenv("NN_DECOMP_TEST_KEY", "secret")
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    assert judge.explain([example("a tax", {"tax"})]) == "taxes"
    assert judge.pick_intruder([example("a b", set())] * 4) == 2
    url, headers, body = sent[0]
    assert url == "http://judge.invalid/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert body["model"] == "m" and "<<tax>>" in body["messages"][0]["content"]


@pytest.mark.parametrize("arch", ["transcoder", "clt"])
def test_ablation_is_causal_and_moves_the_prediction_where_the_feature_fires(arch, tiny_lm, contexts, one_thread):
    d = dictionary(arch)
    tokens_BT = contexts[:2]
    a_BT = torch.zeros(tokens_BT.shape)
    a_BT[:, 10] = 5.0
    kl_BT, dlogp_BT = ablation_kl(tiny_lm, d, tokens_BT, a_BT, 0, latent=3)
    assert kl_BT[:, :10].abs().max() < 1e-6 and dlogp_BT[:, :10].abs().max() < 1e-5  # before it fires
    assert (kl_BT[:, 10] > 1e-6).all()
    fire, quiet, _ = ablation_effect(tiny_lm, d, tokens_BT, a_BT, 0, 3, torch.ones_like(tokens_BT, dtype=torch.bool))
    assert fire > quiet >= 0
    zero = ablation_kl(tiny_lm, d, tokens_BT, torch.zeros(tokens_BT.shape), 0, 3)[0]
    assert zero.abs().max() < 1e-6


def test_report_end_to_end_writes_a_self_contained_dashboard(tiny_lm, contexts, tmp_path, one_thread):
    cfg = InterpConfig(n_features=3, n_examples=3, window=4, intruder_examples=2, batch_contexts=4)
    report = analyse(tiny_lm, dictionary(), contexts, exclude(tiny_lm.tokenizer), cfg)
    assert len(report.features) == 3 and report.density.shape == (64,)
    for f in report.features:
        assert f.examples and f.explanation.startswith("fires on") and math.isfinite(f.kl_firing)
        assert all(e.max_act > 0 for e in f.examples) and f.density > 0
    assert 0 < report.summary["alive_fraction"] <= 1 and report.summary["intruder_chance"] == pytest.approx(1 / 3)
    page, hist, table, summary = write_report(report, tmp_path, "tiny <test>")
    text = page.read_text()
    assert text.count('class="feature"') == 3 and "tiny &lt;test&gt;" in text
    assert "<script" not in text and "src=\"http" not in text and "data:image/png;base64," in text
    assert hist.stat().st_size > 1000 and len(table.read_text().splitlines()) == 4
    assert json.loads(summary.read_text())["n_features_analysed"] == 3

