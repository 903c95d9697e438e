"""`inject_embeddings` against the original per-sample loop, its registration as custom ops, and
torch.compile (no graph breaks; one graph for every batch shape, counted)."""

from __future__ import annotations

import pytest
import torch

from llara_dist.errors import DataError
from llara_dist.ops import inject_embeddings
from llara_dist.ops.inject import backward_torch, forward_torch


def loop_reference(inputs_embeds, slots, rows):
    """The original LLaRA injection: per sample, find the placeholders, write row by row."""
    out = inputs_embeds.clone()
    for b in range(inputs_embeds.shape[0]):
        for pos in (slots[b] >= 0).nonzero().squeeze(1).tolist():
            out[b, pos] = rows[slots[b, pos]]
    return out


def make_case(batch=3, length=11, dim=7, n_rows=5, per_sample=4, dtype=torch.float32, seed=0):
    """Random embeddings with `per_sample` placeholders per sample; rows repeat across samples."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64).to(dtype)
    rows = torch.randn(n_rows, dim, generator=gen, dtype=torch.float64).to(dtype)
    slots = torch.full((batch, length), -1, dtype=torch.int64)
    for b in range(batch if per_sample else 0):
        pos = torch.randperm(length, generator=gen)[:per_sample]
        slots[b, pos] = torch.randint(0, n_rows, (per_sample,), generator=gen)
    return x, slots, rows


def values_and_grads(fn, x, slots, rows, grad):
    x = x.detach().requires_grad_(True)
    rows = rows.detach().requires_grad_(True)
    out = fn(x, slots, rows)
    out.backward(grad)
    return out.detach(), x.grad, rows.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_loop_values_and_grads(dtype):
    x, slots, rows = make_case(dtype=dtype, n_rows=3, per_sample=5)  # rows repeat
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, gx, gr = values_and_grads(inject_embeddings, x, slots, rows, grad)
    ref_out, ref_gx, ref_gr = values_and_grads(loop_reference, x, slots, rows, grad)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=0)
    # Repeated rows: the loop accumulates in `dtype`, the op in float32 (then casts), so compare
    # with the float64 sum rounded once.
    inject = slots >= 0
    exact = torch.zeros(rows.shape, dtype=torch.float64).index_add_(
        0, slots[inject], grad[inject].double())
    torch.testing.assert_close(gr, exact.to(dtype))
    torch.testing.assert_close(gr, ref_gr, rtol=0.05, atol=0.05)
    assert (gr != 0).any()


def test_does_not_modify_inputs_and_keeps_other_positions():
    x, slots, rows = make_case()
    x0, rows0 = x.clone(), rows.clone()
    out = inject_embeddings(x, slots, rows)
    assert torch.equal(x, x0) and torch.equal(rows, rows0)
    keep = slots < 0
    assert torch.equal(out[keep], x[keep])
    assert torch.equal(out[~keep], rows[slots[~keep]])


def test_no_placeholders_and_empty_rows():
    x = torch.randn(2, 6, 5, requires_grad=True)
    rows = torch.randn(0, 5, requires_grad=True)
    slots = torch.full((2, 6), -1, dtype=torch.int64)
    out = inject_embeddings(x, slots, rows)
    assert torch.equal(out, x.detach())
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and rows.grad.shape == (0, 5)


def test_rows_grad_only_when_inputs_are_frozen():
    # Frozen token embeddings: only the rows (projector output) need a grad.
    x, slots, rows = make_case(n_rows=3, per_sample=5)
    rows.requires_grad_(True)
    grad = torch.randn(x.shape)
    inject_embeddings(x, slots, rows).backward(grad)
    expected = torch.zeros_like(rows).index_add_(0, slots[slots >= 0], grad[slots >= 0])
    torch.testing.assert_close(rows.grad, expected)


def test_gradcheck_float64():
    x, slots, rows = make_case(batch=2, length=6, dim=3, n_rows=3, per_sample=3, dtype=torch.float64)
    x.requires_grad_(True)
    rows.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, r: inject_embeddings(a, slots, r), (x, rows))


@pytest.mark.parametrize("bad", [5, -2])
def test_out_of_range_slot_is_a_clear_error(bad):
    x, slots, rows = make_case(n_rows=5)
    slots[1, 3] = bad
    with pytest.raises(DataError, match=r"slots\(1, 3\).*\[0, 5\)"):
        inject_embeddings(x, slots, rows)


def test_shape_and_dtype_errors():
    x, slots, rows = make_case()
    with pytest.raises(ValueError, match="rows must be"):
        inject_embeddings(x, slots, rows[:, :3])
    with pytest.raises(ValueError, match="slots must be"):
        inject_embeddings(x, slots[:, :4], rows)
    with pytest.raises(ValueError, match="dtype"):
        inject_embeddings(x, slots, rows.double())


@pytest.mark.parametrize("n_rows,per_sample", [(3, 5), (0, 0)])
def test_dense_kernel_matches_sparse_kernel(n_rows, per_sample):
    # The sync-free dense kernel serves non-CPU devices without triton; it is device independent,
    # so check it here against the sparse CPU kernel.
    x, slots, rows = make_case(n_rows=n_rows, per_sample=per_sample)
    grad = torch.randn(x.shape)
    sparse_out = forward_torch(x, slots, rows, sparse=True)
    torch.testing.assert_close(forward_torch(x, slots, rows, sparse=False), sparse_out, rtol=0, atol=0)
    for need_inputs in (True, False):
        sparse_grads = backward_torch(grad, slots, n_rows, need_inputs, sparse=True)
        dense_grads = backward_torch(grad, slots, n_rows, need_inputs, sparse=False)
        torch.testing.assert_close(dense_grads, sparse_grads, rtol=0, atol=1e-6)
        assert (dense_grads[0] is None) == (not need_inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_registration(dtype):
    x, slots, rows = make_case(n_rows=3, per_sample=5, dtype=dtype)
    grad = torch.randn(x.shape).to(dtype)
    ops = torch.ops.llara
    torch.library.opcheck(ops.inject_embeddings.default, (x.requires_grad_(True), slots, rows))
    torch.library.opcheck(ops.inject_embeddings_backward.default, (grad, slots, 3))
    torch.library.opcheck(ops.inject_embeddings_rows_grad.default, (grad, slots, 3))


class TinyInjector(torch.nn.Module):
    """What the model does: embed tokens, project the batch's items, inject them."""

    def __init__(self, vocab=20, dim=8, rec_dim=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.embed.weight.requires_grad_(False)  # frozen like the LLM's embeddings
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(rec_dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))

    def forward(self, ids, slots, item_vectors):
        return inject_embeddings(self.embed(ids), slots, self.projector(item_vectors))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyInjector()
    ids = torch.randint(0, 20, (2, 9))
    _, slots, _ = make_case(batch=2, length=9, n_rows=3, per_sample=4)
    items = torch.randn(3, 4)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(ids, slots, items)
    ref = model(ids, slots, items)
    torch.testing.assert_close(out, ref)
    out.pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.projector.parameters()]
    model.zero_grad()
    ref.pow(2).sum().backward()
    for got, want in zip(grads, model.projector.parameters()):
        torch.testing.assert_close(got, want.grad)
    explanation = torch._dynamo.explain(model)(ids, slots, items)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _counting_aot_eager(graphs: list):
    """A torch.compile backend that records every graph holding the op, then runs aot_eager."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        if any(node.target is torch.ops.llara.inject_embeddings.default for node in gm.graph.nodes):
            graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return backend


def test_torch_compile_dynamic_shapes_one_graph():
    # Every batch has its own B, L and number of distinct items N: one compiled graph must serve
    # them all (a fake impl or wrapper that specialised on a size would recompile per shape).
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyInjector()
    graphs: list = []
    compiled = torch.compile(model, fullgraph=True, backend=_counting_aot_eager(graphs), dynamic=True)

    def run(batch, length, n_rows):
        ids = torch.randint(0, 20, (batch, length))
        _, slots, _ = make_case(batch=batch, length=length, n_rows=n_rows, per_sample=min(n_rows, 4))
        items = torch.randn(n_rows, 4)
        out = compiled(ids, slots, items)
        torch.testing.assert_close(out, model(ids, slots, items))
        out.sum().backward()

    run(2, 9, 3)
    first = len(graphs)
    assert first >= 1
    for shape in [(3, 14, 5), (4, 20, 7), (2, 6, 2), (5, 33, 12)]:
        run(*shape)
    assert len(graphs) == first, f"{len(graphs) - first} recompiles for 4 more batch shapes (expected none)"
    # Sizes 0 and 1 are specialised by dynamo (torch's 0/1 specialisation, not the op): a batch of
    # one sample with one item compiles once more, and that graph too is reused.
    run(1, 6, 1)
    after_one = len(graphs)
    assert after_one <= first + 1
    run(1, 11, 1)
    assert len(graphs) == after_one
