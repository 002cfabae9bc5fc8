"""The offload slots give back exactly the tensors they were handed (values, dtype, shape, strides, storage offset),
in the order the backward asks for them, and pin no more host memory than a tensor's size plus one granule."""

import pytest
import torch

from train.activation_offload import CHUNK_GRANULE, ActivationOffload, _power_of_two_chunks


def _saved_tensors(device: str) -> list[torch.Tensor]:
    """What a compiled layer saves: fp32 and bf16 activations, contiguous, transposed (attention's output layout),
    and a view into the middle of a larger storage."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 12, generator=generator).to(device)
    product = torch.randn(14, 40, generator=generator).to(device, torch.bfloat16)
    attention = torch.randn(2, 7, 3, 4, generator=generator).to(device, torch.bfloat16).transpose(1, 2)
    window = torch.randn(30, 5, generator=generator).to(device)[3:9]
    return [hidden, product, attention, window]


def _round_trip(device: str, product_layers: int = 0) -> None:
    offload = ActivationOffload(3, product_layers=product_layers)
    slot = offload.slots[2]
    tensors = _saved_tensors(device)
    expected = [(t.clone(), t.stride(), t.storage_offset()) for t in tensors]
    for step in range(2):  # the second step reuses the first one's host buffers
        slot.begin()
        positions = [slot.store(t) for t in tensors]
        assert slot.stored_shapes() == [tuple(t.shape) for t in tensors]
        for position, (values, stride, offset) in reversed(list(zip(positions, expected, strict=True))):
            back = slot.load(position)
            assert back.device.type == device and back.dtype == values.dtype
            assert back.stride() == stride and back.storage_offset() == offset
            assert torch.equal(back, values), (step, position)
        assert slot.fetched is None and slot.spent  # nothing left to fetch until the next forward


def test_a_slot_gives_back_each_saved_tensor_as_it_was_stored():
    _round_trip("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and the copy stream need CUDA")
def test_on_the_gpu_a_slot_copies_through_pinned_power_of_two_chunks():
    _round_trip("cuda", product_layers=3)
    offload = ActivationOffload(2)
    big = torch.randn(5 * CHUNK_GRANULE // 4 + 5, device="cuda")  # 5 MiB + 20 bytes: a 4 MiB chunk, a 2 MiB one
    offload.slots[1].begin()
    offload.slots[1].store(big)
    chunks = [chunk.numel() for chunk in offload.slots[1].copies[0].chunks]
    assert chunks == [4 * CHUNK_GRANULE, 2 * CHUNK_GRANULE]
    assert all(chunk.is_pinned() for chunk in offload.slots[1].copies[0].chunks)
    assert torch.equal(offload.slots[1].load(0), big)


@pytest.mark.parametrize("nbytes", [1, CHUNK_GRANULE, CHUNK_GRANULE + 1, 147 * 10**6, 109 * 10**6])
def test_pinned_chunks_waste_less_than_one_granule(nbytes):
    """torch's pinned allocator rounds each request up to a power of two (147 MB would pin 256 MiB); chunks that
    are each a power of two cover the tensor with less than one granule to spare."""
    chunks = _power_of_two_chunks(nbytes)
    assert nbytes <= sum(chunks) < nbytes + CHUNK_GRANULE
    assert len(set(chunks)) == len(chunks) and all(chunk & (chunk - 1) == 0 for chunk in chunks)
