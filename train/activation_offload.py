"""What decoder layers keep for their backward, waiting in pinned CPU memory instead of on the GPU.

A layer's saved tensors go to the host on a side stream right after its forward and come back on the same stream
ahead of its backward, so the PCIe copies overlap the other layers' compute. Two ways in: `activations_in_cpu_memory`
puts saved-tensor hooks around a compiled selective layer (its input, or with `products` every activation its
graph saves), `offloaded_checkpoint` is a reentrant-style checkpoint whose only kept tensor is the layer's input.

Pinned buffers are kept per layer and reused every step. Each is made of power-of-two chunks, because torch's
pinned-memory allocator rounds every request up to a power of two: a 147 MB product would otherwise pin 256 MB.
"""

from __future__ import annotations

import contextlib

import torch

CHUNK_GRANULE = 1 << 20  # the smallest pinned chunk: bytes are rounded up to this, then split into powers of two
PRODUCT_LOOKAHEAD = 3  # layers ahead whose products the backward fetches: a layer's products take longer to copy
# back than its backward takes to run (~0.68 GB at ~40 GB/s against ~12 ms on the 22b at 4096 tokens)


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under `tensor`, as one flat uint8 tensor (a view, no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())


def _power_of_two_chunks(nbytes: int) -> list[int]:
    """`nbytes`, rounded up to CHUNK_GRANULE, as a sum of distinct powers of two, largest first."""
    rounded = -(-nbytes // CHUNK_GRANULE) * CHUNK_GRANULE
    return [1 << bit for bit in reversed(range(rounded.bit_length())) if rounded >> bit & 1]


class _HostCopy:
    """One saved tensor's storage in pinned CPU memory (a plain copy for CPU tensors), and how to view it again."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []  # pinned uint8 chunks, their sizes powers of two, reused every step
        self.nbytes = 0
        self.view: tuple[torch.dtype, int, torch.Size, tuple[int, ...]] | None = None

    def write(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """Start copying `tensor`'s storage out (on `stream`, which must already wait for `tensor`)."""
        data = _storage_bytes(tensor)
        self.nbytes, self.view = data.numel(), (tensor.dtype, tensor.storage_offset(), tensor.size(), tensor.stride())
        if stream is None:
            self.chunks = [data.clone()]
            return
        sizes = _power_of_two_chunks(self.nbytes)
        if [chunk.numel() for chunk in self.chunks] != sizes:
            self.chunks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for size in sizes]
        with torch.cuda.stream(stream):
            for chunk, start, length in self._spans():
                chunk[:length].copy_(data[start:start + length], non_blocking=True)
        data.record_stream(stream)  # its memory is not reused before the copy has read it

    def read(self, device: torch.device, stream: torch.cuda.Stream | None) -> torch.Tensor:
        """Start copying the storage back to `device` (on `stream`); returns it as the tensor it was saved as."""
        if stream is None:
            data = self.chunks[0]
        else:
            # Allocated on the current stream, whose pool gets it back when the backward is done with it (a block
            # from the side stream's pool would stay there, out of the compute's reach); so the copy waits for the
            # work queued so far, which may still be reading that block's previous tenant.
            data = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            data.record_stream(stream)
            with torch.cuda.stream(stream):
                for chunk, start, length in self._spans():
                    data[start:start + length].copy_(chunk[:length], non_blocking=True)
        dtype, offset, size, stride = self.view
        return torch.empty(0, dtype=dtype, device=data.device).set_(data.untyped_storage(), offset, size, stride)

    def _spans(self):
        """(chunk, first byte of the storage it holds, bytes it holds), for each chunk that holds any."""
        start = 0
        for chunk in self.chunks:
            length = min(chunk.numel(), self.nbytes - start)
            if length > 0:
                yield chunk, start, length
            start += chunk.numel()


class OffloadSlot:
    """What one decoder layer keeps for its backward, in pinned CPU memory, between its forward and its backward.

    Copies run on the offload's side stream. The backward of layer i fetches layer i-1's tensors (and, for layers
    whose products wait here too, those of a few layers more), so they are usually back when needed. On CPU (the
    tests) the slot keeps plain copies.
    """

    def __init__(self, offload: ActivationOffload, index: int, products: bool = False):
        self.offload, self.index, self.products = offload, index, products
        self.copies: list[_HostCopy] = []
        self.stored = 0  # tensors stored by the layer's latest forward
        self.fetched: list[torch.Tensor | None] | None = None  # on their way back, until loaded
        self.spent = False  # every stored tensor was loaded back: nothing to fetch until the next forward
        self.ready: torch.cuda.Event | None = None  # recorded on the side stream after this slot's copies back
        self.device: torch.device | None = None

    def begin(self) -> None:
        """A new forward of the layer: whatever an abandoned step left here is dropped."""
        self.stored, self.fetched, self.spent = 0, None, False

    def store(self, tensor: torch.Tensor) -> int:
        """Start copying `tensor` out; returns its position for `load`."""
        position = self.stored
        self.stored += 1
        if position == len(self.copies):
            self.copies.append(_HostCopy())
        stream = None
        if tensor.device.type == "cuda":
            stream = self.offload.stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
        self.copies[position].write(tensor, stream)
        self.device = tensor.device
        return position

    def stored_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the tensors this slot holds for its layer (its latest forward's)."""
        return [tuple(copy.view[2]) for copy in self.copies[:self.stored]]

    def fetch(self) -> None:
        """Start copying this layer's tensors back to the GPU, unless already started or none is held."""
        if not self.stored or self.fetched is not None or self.spent:
            return
        stream = self.offload.stream(self.device) if self.device.type == "cuda" else None
        self.fetched = [copy.read(self.device, stream) for copy in self.copies[:self.stored]]
        if stream is not None:
            self.ready = stream.record_event()

    def load(self, position: int) -> torch.Tensor:
        """The tensor stored at `position`, on its device, ready for the current stream; fetches the next layers'."""
        self.fetch()
        tensor, self.fetched[position] = self.fetched[position], None
        if tensor.device.type == "cuda":
            # This slot's copies only: waiting for the whole side stream would also wait for the fetches of the
            # layers after it, queued since.
            current = torch.cuda.current_stream(tensor.device)
            current.wait_event(self.ready)
            tensor.record_stream(current)
        if all(entry is None for entry in self.fetched):
            self.fetched, self.spent = None, True
        self.offload.prefetch_before(self.index)
        return tensor


class ActivationOffload:
    """The offload slots of one model's decoder layers and the side stream their copies run on."""

    def __init__(self, layers: int, product_layers: int = 0):
        self.slots = [OffloadSlot(self, i, products=i < product_layers) for i in range(layers)]
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def prefetch_before(self, index: int) -> None:
        """The backward has reached layer `index`: fetch the layer it reaches next, and products a few layers on."""
        for ahead in range(index - 1, max(index - 1 - PRODUCT_LOOKAHEAD, -1), -1):
            if ahead == index - 1 or self.slots[ahead].products:
                self.slots[ahead].fetch()


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpointing whose only kept tensor, the layer's input, waits in CPU memory for the backward.

    Reentrant-style: the forward's graph is dropped as soon as the layer has run, the backward reruns the layer
    with the forward's RNG state (the same dropout masks) and autocast, then backpropagates through it. Both runs
    build the autograd graph, so a compiled layer runs one compiled graph twice, as under full checkpointing (a
    no-grad graph could number its random ops differently). `anchor` requires grad so that the first layer, whose
    input does not, still gets a backward (its LoRA weights need one).
    """

    @staticmethod
    def forward(ctx, hidden, anchor, slot, run):
        ctx.slot, ctx.run = slot, run
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = (hidden.device.type, torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        slot.begin()
        ctx.position = slot.store(hidden)
        with torch.enable_grad():  # the input's requires_grad as in the backward's rerun: the same compiled graph
            return run(hidden.detach().requires_grad_(hidden.requires_grad)).detach()

    @staticmethod
    def backward(ctx, grad):
        # needs_input_grad: as in the forward
        hidden = ctx.slot.load(ctx.position).detach().requires_grad_(ctx.needs_input_grad[0])
        device_type, autocast, dtype = ctx.autocast
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
                out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return hidden.grad if ctx.needs_input_grad[0] else None, None, None, None


def offloaded_checkpoint(compiled, slot: OffloadSlot, attention_context=contextlib.nullcontext):
    """A layer's forward whose input waits in CPU memory; the backward's rerun sees the forward's attention choice."""
    anchor = torch.ones((), requires_grad=True)

    def forward(hidden_states, *args, **kwargs):
        def run(hidden):
            with attention_context():
                return compiled(hidden, *args, **kwargs)

        return _OffloadedCheckpoint.apply(hidden_states, anchor, slot, run)

    return forward


def _resident_storages(layer: torch.nn.Module) -> set[int]:
    """Storages that live on the GPU anyway: the layer's parameters, buffers and 4-bit quantization constants.

    A compiled graph saves its weight inputs for the backward too; copying those out would free nothing.
    """
    tensors = [*layer.parameters(), *layer.buffers()]
    for param in layer.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            tensors += [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
            state = getattr(state, "state2", None)
    return {tensor.untyped_storage().data_ptr() for tensor in tensors}


def activations_in_cpu_memory(forward, offload: ActivationOffload, index: int, offloaded: bool = True,
                         layer: torch.nn.Module | None = None):
    """A selective layer's forward whose saved input waits in pinned CPU memory, and for a layer whose slot holds
    products (its compiled graph keeps its frozen products) every activation the graph saves: saved-tensor hooks
    around the compiled call, the graph itself unchanged.

    An ordinary selective layer's only large saved tensor is its input. A layer that keeps its products would hold
    (5 x hidden + 2 x intermediate) x 2 bytes per token on the GPU until its backward; sent out, only their copies'
    PCIe time is left, which the first layers of the forward have the most of (their backward comes last). What
    goes out is every floating-point tensor at least an eighth of the input's size that is not one of the layer's
    own weights (`layer`). The last layer (`offloaded` False) keeps its own tensors, which the backward needs first,
    and only starts the next fetch.
    """
    slot = offload.slots[index]
    resident: set[int] | None = None

    def forward_with_hooks(hidden_states, *args, **kwargs):
        nonlocal resident
        storage, shape = hidden_states.untyped_storage().data_ptr(), hidden_states.shape
        if slot.products and resident is None:
            resident = _resident_storages(layer)
        smallest = hidden_states.numel() // 8

        def goes_out(tensor: torch.Tensor) -> bool:
            if not offloaded:
                return False
            if tensor.untyped_storage().data_ptr() == storage:
                return tensor.shape == shape and tensor.is_contiguous()
            return (slot.products and tensor.is_floating_point() and tensor.numel() >= smallest
                    and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
                    and tensor.untyped_storage().data_ptr() not in resident)

        def pack(tensor):
            return (slot, slot.store(tensor)) if goes_out(tensor) else tensor

        def unpack(packed):
            if isinstance(packed, tuple) and len(packed) == 2 and packed[0] is slot:
                return slot.load(packed[1])  # and starts the next layers' fetch
            offload.prefetch_before(index)
            return packed

        slot.begin()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return forward(hidden_states, *args, **kwargs)

    return forward_with_hooks
