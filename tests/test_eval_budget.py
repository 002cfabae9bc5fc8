"""Eval's GPU budget: free memory less the largest forward's activations and the allocator's slack, one rule that
eval applies (eval/precision.py, eval/placement.py) and the doctor predicts (pipeline/doctor.py).

The first rehearsal (benchmarks/RESULTS.md, Rehearsal: the previous run) is the case it exists for: eval capped
at 6 GiB on the 22b's widths at 6 layers put 4.6 GB of weights on the GPU under the old `free / 1.3` rule, and the
first 25-shot ARC batch (8 x 1306 tokens) ran out of memory; the rehearsal after the fix passed under that cap.
"""

from __future__ import annotations

import pytest
import torch

from eval.placement import memory_budgets
from eval.precision import choose_precision, model_shape, stored_dtype
from pipeline.config import EvalConfig, RunConfig
from pipeline.doctor import Device, RunShapes, eval_gpu_check, eval_placement
from pipeline.sizing import DTYPE_BYTES, EVAL_ALLOCATOR_SLACK, GIB, LlamaShape, eval_memory

# Llama-2-13b's widths and the 22b's (llama-30b's), 6 layers deep as in the rehearsal.
BASE_6 = LlamaShape(5120, 13824, 6, 40, 40, 128, 32000)
WIDENED_6 = LlamaShape(6656, 17920, 6, 52, 52, 128, 32000)
# Measured on the H200 (design note train-and-eval.md): one scoring forward of 8 x 1300 tokens at the 22b widths
# peaked this far above the weights, without a KV cache.
MEASURED_SCORING_PEAK = 1.56 * GIB
OLD_MARGIN = 1.3


def rehearsal_shapes() -> RunShapes:
    evaluated = [("base", BASE_6, "float16"), ("surgery", WIDENED_6, "bfloat16"), ("trained", WIDENED_6, "bfloat16")]
    return RunShapes(None, WIDENED_6, WIDENED_6, evaluated)


def test_the_rehearsal_card_keeps_room_for_the_forward_that_ran_out_of_memory(tmp_path):
    config = RunConfig(run_dir=tmp_path)
    free = 6 * GIB
    card = Device("rehearsal cap", free, free, 1)
    placement = eval_placement(config, rehearsal_shapes(), card)

    assert placement.dtype == "bfloat16"  # 14.6 GB of float32 weights fit nowhere near 6 GiB
    # The estimate covers the scoring forward measured at these widths (the 25-shot ARC batch is one of its size).
    assert placement.activations >= MEASURED_SCORING_PEAK
    # What the old rule left beside the weights was less than that forward needs: the rehearsal's out-of-memory.
    assert free - free / OLD_MARGIN < MEASURED_SCORING_PEAK
    # The new budget keeps the estimated activations and the slack free, with accelerate's layer in transit inside.
    assert placement.budget + placement.activations + EVAL_ALLOCATOR_SLACK <= free
    assert placement.on_gpu + placement.block <= placement.budget
    assert placement.on_gpu > 0 and placement.in_ram == placement.weights - placement.on_gpu
    assert eval_gpu_check(placement, card).status == "warn"


def test_a_card_that_cannot_hold_a_layer_beside_the_forward_fails_with_the_fix(tmp_path):
    config = RunConfig(run_dir=tmp_path)
    card = Device("small", 4 * GIB, 4 * GIB, 1)
    check = eval_gpu_check(eval_placement(config, rehearsal_shapes(), card), card)
    assert check.status == "fail" and check.fix == "lower eval.benchmarks.batch_size"

    # The fix works: smaller benchmark batches shrink the largest forward until a layer fits beside it.
    smaller = RunConfig(run_dir=tmp_path, eval={"benchmarks": {"batch_size": 1}})
    assert eval_gpu_check(eval_placement(smaller, rehearsal_shapes(), card), card).status == "warn"


def gpu_reports(monkeypatch, free: int) -> None:
    """Make accelerate report `free` bytes on GPU 0 (no GPU here) and a large host."""
    monkeypatch.setattr("accelerate.utils.get_max_memory", lambda max_memory=None: {0: free, "cpu": 64 * GIB})


@pytest.mark.parametrize(("setting", "room_for", "expected"), [
    ("auto", "float32", "float32"), ("auto", "float16", "float16"), ("auto", None, "float16"),
    ("bfloat16", "float32", "bfloat16"),
])
def test_eval_and_the_doctor_choose_the_same_dtype_and_budget(tiny_llama, tmp_path, monkeypatch, setting, room_for,
                                                              expected):
    base = tiny_llama("base", dtype=torch.float16, vocab_size=1000, intermediate_size=128)
    wide = tiny_llama("wide", hidden_size=48, num_attention_heads=6, num_key_value_heads=6, intermediate_size=192,
                      vocab_size=1000, dtype=torch.float16)
    folders = {"base": base, "surgery": wide}
    models = [(model_shape(folder), stored_dtype(folder)) for folder in folders.values()]
    if room_for is None:  # less than the slack alone: no budget for weights at all
        free = EVAL_ALLOCATOR_SLACK // 2
    else:  # just room for the widened model's weights in `room_for` beside that dtype's largest forward
        activations = eval_memory(EvalConfig(dtype=room_for), models, 0).activations
        free = models[1][0].params * DTYPE_BYTES[room_for] + activations + EVAL_ALLOCATOR_SLACK + 1
    # accelerate reports `free` bytes on GPU 0 (there is no GPU here) and a large host.
    monkeypatch.setattr("accelerate.utils.get_max_memory", lambda max_memory=None: {0: free, "cpu": 64 * GIB})
    config = RunConfig(run_dir=tmp_path, eval={"dtype": setting})
    cuda = torch.device("cuda", 0)

    precision = choose_precision(config.eval, folders, cuda)
    budget = memory_budgets(cuda, precision.activations)[0]
    evaluated = [(label, shape, dtype) for label, (shape, dtype) in zip(folders, models, strict=True)]
    predicted = eval_placement(config, RunShapes(None, None, None, evaluated), Device("card", free, free, 1))

    assert precision.compute == predicted.dtype == expected
    assert precision.activations == predicted.activations
    assert budget == predicted.budget
    assert (budget == 0) == (room_for is None)
