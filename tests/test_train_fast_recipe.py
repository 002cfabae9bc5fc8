"""The fast recipe's CPU-checkable parts: one dequantization per pass computes exactly what bitsandbytes does, and every
checkpointing mode backpropagates what transformers' checkpointing does."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from train.fast_recipe import dequantize_once_per_pass  # noqa: E402


def _nf4_linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 128) * 0.05, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).to("cpu")
    return layer


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.square().sum()).backward()
    return out.detach(), x.grad


def test_dequantize_once_matches_bitsandbytes_in_training_and_defers_in_eval():
    reference, patched = torch.nn.Sequential(_nf4_linear(0)), torch.nn.Sequential(_nf4_linear(0))
    assert dequantize_once_per_pass(patched) == 1
    x = torch.randn(3, 5, 128)
    reference.train()
    patched.train()
    out_ref, grad_ref = _forward_backward(reference, x)
    out_new, grad_new = _forward_backward(patched, x)
    assert torch.allclose(out_new, out_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_new, grad_ref, rtol=1e-5, atol=1e-6)
    # The patched forward keeps the dequantized weight for the backward: no second dequantization there.
    assert grad_new.abs().sum() > 0

    reference.eval()
    patched.eval()
    with torch.no_grad():
        assert torch.equal(patched(x), reference(x))


@pytest.mark.parametrize("shape,nested", [((96, 128), True), ((600, 640), True), ((64, 320), False)])
def test_one_kernel_dequantization_is_bitsandbytes_bit_for_bit(shape, nested):
    """Through the custom op's CPU path: the QuantState's parts reach it in bitsandbytes' order (600 x 640 has
    6000 blocks, so more than one 256-block of the nested absmax). The CUDA kernel is checked on the GPU by
    benchmarks/dequant_bench.py."""
    from train.nf4_kernel import dequantize

    torch.manual_seed(3)
    weight = bnb.nn.Params4bit(torch.randn(shape) * 0.05, requires_grad=False, quant_type="nf4",
                               compress_statistics=nested).to("cpu")
    assert torch.equal(dequantize(weight.data, weight.quant_state),
                       bnb.functional.dequantize_4bit(weight.data, weight.quant_state))


def test_one_kernel_path_trains_exactly_like_bitsandbytes():
    kernel, one = torch.nn.Sequential(_nf4_linear(4)), torch.nn.Sequential(_nf4_linear(4))
    dequantize_once_per_pass(kernel)
    dequantize_once_per_pass(one, one_kernel=True)
    assert one[0].dequantize_in_one_kernel and not kernel[0].dequantize_in_one_kernel
    x = torch.randn(3, 5, 128)
    out_kernel, grad_kernel = _forward_backward(kernel.train(), x)
    out_one, grad_one = _forward_backward(one.train(), x)
    assert torch.equal(out_one, out_kernel) and torch.equal(grad_one, grad_kernel)


def test_output_keeps_the_input_dtype_so_an_fp32_stream_stays_fp32():
    layer = torch.nn.Sequential(_nf4_linear(1))
    layer[0].compute_dtype = torch.bfloat16
    dequantize_once_per_pass(layer)
    layer.train()
    out = layer(torch.randn(2, 128, dtype=torch.float32, requires_grad=True))
    assert out.dtype == torch.float32


# ---- what a decoder layer keeps for its backward ---------------------------------------------------------------
# compile_decoder_layers with the compiler left out (torch.compile takes minutes on these CPUs and is torch's own
# job): what is under test is that every checkpointing mode backpropagates exactly what full checkpointing does.

def _no_compile(forward, **options):
    return forward


def _lora_llama(folder, checkpointing: str | None, saved_layers: int = 0, offload_inputs: bool = False):
    """A tiny Llama with dropout-0.1 LoRA and non-zero B matrices (so A's gradient depends on the dropout masks)."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import LoraSettings
    from train.fast_recipe import compile_decoder_layers
    from train.model import prepare_for_training

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = prepare_for_training(model, LoraSettings(r=4, alpha=8, dropout=0.1), gradient_checkpointing=True)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    if checkpointing is not None:
        compile_decoder_layers(peft_model.get_base_model().model.layers, checkpointing, compiler=_no_compile,
                               saved_layers=saved_layers, rank=4, offload_inputs=offload_inputs)
    return peft_model.train()


def _loss_and_gradients(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout masks for every model
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing,saved_layers,offload_inputs",
                         [("full", 0, False), ("selective", 0, False), ("selective", 2, False),
                          ("selective", 1, True), ("offload", 0, False)])
def test_every_checkpointing_mode_backpropagates_what_transformers_checkpointing_does(tiny_llama, checkpointing,
                                                                                       saved_layers, offload_inputs):
    folder = tiny_llama(num_hidden_layers=3)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    reference_loss, reference = _loss_and_gradients(_lora_llama(folder, None), ids)
    loss, gradients = _loss_and_gradients(_lora_llama(folder, checkpointing, saved_layers, offload_inputs), ids)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert gradients.keys() == reference.keys()
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, reference[name], rtol=1e-5, atol=1e-7), name
    # The first layer's input needs no gradient; its LoRA weights still get one (offload's anchor).
    first_q = next(g for name, g in gradients.items() if "layers.0.self_attn.q_proj.lora_A" in name)
    assert first_q.abs().sum() > 0


def test_selective_checkpointing_skips_down_proj_or_every_frozen_product_in_the_backward(tiny_llama):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    layers, saved = 3, 2
    folder = tiny_llama(num_hidden_layers=layers)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    counts = {}
    for name, checkpointing, saved_layers in (("full", "full", 0), ("selective", "selective", 0),
                                              ("saved", "selective", saved)):
        model = _lora_llama(folder, checkpointing, saved_layers)
        loss = model(input_ids=ids, labels=ids).loss
        with CountProducts() as products:
            loss.backward()
        counts[name] = products.count
    assert counts["full"] - counts["selective"] == layers
    # A layer that keeps its frozen products runs none of its 7 again (LoRA's rank-4 products it does rerun).
    assert counts["full"] - counts["saved"] == (layers - saved) + 7 * saved


def _fx_backend(backward_graphs: list):
    """torch.compile's backend for what the GPU runs, in seconds on CPU: AOTAutograd with inductor's min-cut
    partitioner, the graphs kept as FX instead of being lowered; every backward graph is appended to the list."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def keep_backward(graph, example_inputs):
        backward_graphs.append(graph)
        return graph

    return aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=keep_backward,
                        partition_fn=min_cut_rematerialization_partition)


def _train_compiled_as_on_the_gpu(folder, ids: torch.Tensor, **levers):
    """The tiny LoRA Llama's layers compiled by `_fx_backend` under selective checkpointing with `levers`, one
    training step checked against the eager model's (loss and every gradient); returns the layers and the frozen
    or LoRA matmuls of each backward graph, in the order autograd ran them (the last layer first)."""
    import functools

    from train.fast_recipe import compile_decoder_layers

    reference_loss, reference = _loss_and_gradients(_lora_llama(folder, None), ids)
    torch._dynamo.reset()
    model = _lora_llama(folder, None)
    layers = model.get_base_model().model.layers
    backward_graphs = []
    compile_decoder_layers(layers, "selective", rank=4,
                           compiler=functools.partial(torch.compile, backend=_fx_backend(backward_graphs)), **levers)
    loss, gradients = _loss_and_gradients(model, ids)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, reference[name], rtol=1e-4, atol=1e-6), name
    products = [sum(node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
                    for node in graph.graph.nodes) for graph in backward_graphs]
    return layers, products


@pytest.mark.parametrize("offload_inputs", [False, True])
def test_under_compile_a_saved_layer_skips_six_frozen_products_and_the_others_only_down_proj(tiny_llama,
                                                                                              offload_inputs):
    """What the GPU runs: the layers compiled with AOTAutograd's min-cut partitioner (inductor's), graphs kept as
    FX instead of being lowered. The backward graph of an ordinary selective layer reruns 6 of the 7 frozen
    products (down_proj's is never read), a saved layer's none, and both train exactly as the eager model does,
    also when the compiled graph's saved input goes through the offload slot (all layers' but the last)."""
    folder = tiny_llama(num_hidden_layers=2, intermediate_size=96)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    layers, products = _train_compiled_as_on_the_gpu(folder, ids, saved_layers=1, offload_inputs=offload_inputs)
    if offload_inputs:  # the first layer's input went through its slot (a copy, on CPU); the last layer kept its own
        assert layers[0].offload_slot.stored_shapes() == [(2, 12, 32)] and not hasattr(layers[1], "offload_slot")
    saved, ordinary = products
    assert len(products) == 2 and ordinary - saved == 6


def test_a_layer_whose_products_wait_in_cpu_memory_reruns_none_of_them_and_trains_exactly(tiny_llama):
    """host_saved_layers under the compiled selective checkpointing: the first layer runs the graph that keeps its
    frozen products (its backward reruns none of the six), what that graph saves - its input and those products,
    never its weights - goes through the layer's offload slot (copies, on CPU), and the model trains exactly as the
    eager one does."""
    import math

    folder = tiny_llama(num_hidden_layers=2, intermediate_size=96)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    layers, products = _train_compiled_as_on_the_gpu(folder, ids, host_saved_layers=1)
    ordinary, saved = products
    assert len(products) == 2 and ordinary - saved == 6
    shapes = layers[0].offload_slot.stored_shapes()
    assert (2, 12, 32) in shapes and shapes.count((24, 96)) >= 2  # the input; gate's and up's products
    assert all(math.prod(shape) % 24 == 0 for shape in shapes)  # activations: a multiple of the 24 tokens
    assert not set(shapes) & {tuple(param.shape) for param in layers[0].parameters()}
    assert not hasattr(layers[1], "offload_slot")


def test_a_graph_break_in_a_compiled_layer_is_reported_once(tiny_llama, caplog):
    """A layer that dynamo cannot trace whole still trains (partly eager), so nothing would show the lost speed but
    this warning; the same model without the break compiles silently."""
    import functools
    import logging

    from train.fast_recipe import compile_decoder_layers

    folder = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    for broken in (False, True):
        torch._dynamo.reset()
        model = _lora_llama(folder, None)
        layers = model.get_base_model().model.layers
        if broken:
            for layer in layers:
                mlp_forward = layer.mlp.forward

                def forward_with_break(x, _forward=mlp_forward):
                    torch._dynamo.graph_break()
                    return _forward(x)

                layer.mlp.forward = forward_with_break
        compile_decoder_layers(layers, "selective", rank=4,
                               compiler=functools.partial(torch.compile, backend="aot_eager"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train"):
            _loss_and_gradients(model, ids)
            _loss_and_gradients(model, ids)
        warnings = [r.getMessage() for r in caplog.records if "broke their graph" in r.getMessage()]
        assert len(warnings) == (1 if broken else 0), warnings


def test_packed_dropout_masks_train_exactly_under_the_stages_compiled_checkpointing(tiny_llama):
    """train.fast.dropout_masks=packed on a LoRA Llama: every adapter's dropout is replaced, eval outputs and saved
    weights do not change, and the decoder layers compiled under selective checkpointing rerun the seven mask kernels
    in their backward and give the eager model's loss and gradients, so forward and backward drew the same masks."""
    import functools

    from train.fast_recipe import compile_decoder_layers
    from train.lora_dropout import pack_lora_dropout_masks

    folder = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    plain, eager = _lora_llama(folder, None), _lora_llama(folder, None)
    state = eager.state_dict()
    assert pack_lora_dropout_masks(eager) == 2 * 7
    assert eager.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert torch.equal(eager.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
    reference_loss, reference = _loss_and_gradients(eager.train(), ids)
    assert _loss_and_gradients(plain.train(), ids)[0] != reference_loss  # other masks: the replacement is in the graph

    torch._dynamo.reset()
    compiled = _lora_llama(folder, None)
    pack_lora_dropout_masks(compiled)
    backward_graphs = []
    compile_decoder_layers(compiled.get_base_model().model.layers, "selective", rank=4,
                           compiler=functools.partial(torch.compile, backend=_fx_backend(backward_graphs)))
    loss, gradients = _loss_and_gradients(compiled, ids)
    # The layers did compile (no silent eager fallback), and their backward draws the masks again from the seeds.
    mask_kernel = torch.ops.frankenllama.dropout_keep_words.default
    assert backward_graphs and all(sum(node.target is mask_kernel for node in graph.graph.nodes) == 7
                                   for graph in backward_graphs)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, reference[name], rtol=1e-4, atol=1e-6), name
