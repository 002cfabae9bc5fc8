"""Eval's scoring forwards build no KV cache; the probe's generation does.

A model loaded with its config's `use_cache=True` makes a DynamicCache in every plain forward and keeps every
layer's keys and values alive to the forward's end: lm-eval's `_model_call` is such a forward, ~10 GiB more at the
22b's 40 layers x 8 contexts of 1300 tokens. Counted here on the real transformers cache class, through real
lm-eval, on a tiny random Llama with SmolLM2's tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from eval import benchmarks as bench
from eval.models import ModelEntry, load_model
from eval.perplexity import heldout_perplexity
from eval.preservation import logits_on
from pipeline.config import BenchmarksConfig, BenchmarkSubset
from pipeline.probing import generate_probe_samples, load_probe_prompts

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture
def caches_made(monkeypatch) -> list[int]:
    """Counts every transformers DynamicCache built from now on."""
    from transformers.cache_utils import DynamicCache

    made = [0]
    original = DynamicCache.__init__

    def counting(self, *args, **kwargs):
        made[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(DynamicCache, "__init__", counting)
    return made


def score_one_arc_item(model, tokenizer, tmp_path) -> dict:
    config = BenchmarksConfig(data_dir=bench.FIXTURES_DIR, arc_challenge=BenchmarkSubset(n=1, num_fewshot=1))
    leaves = [leaf for leaf in bench.plan_tasks(config)[0] if leaf.benchmark == "arc_challenge"]
    bench.write_task_yamls(leaves, tmp_path / "tasks")
    return bench.score_items(model, tokenizer, tmp_path / "tasks", leaves, {"arc_challenge": [0]}, batch_size=4)


def test_scoring_forwards_build_no_kv_cache_and_probe_generation_does(tiny_llama_with_tokenizer, tmp_path,
                                                                       caches_made):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama_with_tokenizer("model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The control: a model as transformers loads it builds caches in lm-eval's scoring forwards.
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    score_one_arc_item(plain, tokenizer, tmp_path)
    assert caches_made[0] > 0

    caches_made[0] = 0
    model = load_model(ModelEntry("model", str(folder), folder), torch.device("cpu"), torch.float32, 0)
    scores = score_one_arc_item(model, tokenizer, tmp_path)
    assert list(scores["arc_challenge"]) == [0]
    logits = logits_on(model, [[1, 500, 900, 42], [7, 8]])
    assert [tuple(t.shape) for t in logits] == [(4, 49152), (2, 49152)]
    # One batched forward, the short text right-padded: its logits are those it gets alone.
    assert torch.allclose(logits[1], logits_on(model, [[7, 8]])[0], atol=1e-5)
    heldout_perplexity(model, tokenizer, ["The harbour was busy before dawn, with boats unloading their catch."], 8)
    assert caches_made[0] == 0

    samples = generate_probe_samples(model, tokenizer, load_probe_prompts(2), max_new_tokens=8, batch_size=2,
                                     progress=False)
    assert len(samples) == 2 and caches_made[0] > 0
