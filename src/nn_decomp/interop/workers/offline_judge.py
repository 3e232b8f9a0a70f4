"""The offline stand-in for autointerp's LLM judge in SAEBench's prompts (stdlib only; the sae-bench
worker imports it as a sibling). SAEBench marks a latent's activating tokens <<tok>> in its top
examples; the judge "explains" the latent as its most frequent marked tokens (in «» so SAEBench's
parsing keeps them) and, scoring, predicts the examples that contain one of them. Like the lab's
OfflineJudge (analysis/interp.py) it measures token-level monosemanticity, not what an LLM would
read into the examples: a floor for SAEBench's autointerp score, comparable across dictionaries.
"""
import re
from collections import Counter

EXPLAIN_TOKENS = 3
EXAMPLES = "Here are the examples:"


def respond(messages: list[dict]) -> str:
    """The reply to SAEBench's generation prompt (an explanation) or scoring prompt (example numbers)."""
    user = messages[-1]["content"]
    if EXAMPLES not in user:  # generation: the top examples with their active tokens marked
        marked = Counter(t.strip().lower() for t in re.findall(r"<<(.*?)>>", user) if t.strip())
        return "This neuron activates on " + " ".join(f"«{t}»" for t, _ in marked.most_common(EXPLAIN_TOKENS))
    explanation, examples = user.split(EXAMPLES, 1)
    words = [w for w in re.findall(r"«(.*?)»", explanation) if w]
    hits = [n for n, text in re.findall(r"^(\d+)\. (.*)$", examples, flags=re.M)
            if any(w in text.lower() for w in words)]
    return ", ".join(hits) if hits else "None"
