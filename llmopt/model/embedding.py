"""The input embedding's gradient from aten's own kernel, also under torch.compile (for trainer.deterministic).

torch.compile turns the embedding's backward into a scatter-add of the token rows: atomic adds normally, and in
deterministic mode aten's sorted index_put, which adds all the rows of one token one after another. On real text,
where a few tokens fill much of a batch, that took 11.5 ms per 60M micro-batch on the H200 (21% fewer tokens/s than
without deterministic mode, with flash attention's share; benchmarks/RESULTS.md). aten's embedding backward sorts
too, but splits each token's rows into partial sums: ordered and fast. Wrapped in a custom op, inductor calls it as
it is instead of decomposing it. The forward is the plain lookup, which inductor still fuses with what follows.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("llmopt::embedding_backward", mutates_args=())
def embedding_backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int) -> torch.Tensor:
    """d(loss)/d(weight) of F.embedding(ids, weight, padding_idx): the rows of grad summed per id."""
    return torch.ops.aten.embedding_dense_backward(grad, ids, num_weights, padding_idx, False)


@embedding_backward.register_fake
def _(grad, ids, num_weights, padding_idx):
    return grad.new_empty((num_weights, grad.shape[-1]))


class _OrderedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.num_weights, ctx.padding_idx = weight.shape[0], padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        return None, embedding_backward(grad.contiguous(), ids, ctx.num_weights, ctx.padding_idx), None


class OrderedEmbedding(torch.nn.Embedding):
    """nn.Embedding whose weight gradient is aten's embedding backward, compiled or not. A plain lookup only:
    max_norm, scale_grad_by_freq and sparse (which LLaMA does not use) are refused rather than ignored."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            raise ValueError("OrderedEmbedding is a plain lookup: max_norm, scale_grad_by_freq and sparse are not "
                             "supported; use torch.nn.Embedding for them (without trainer.deterministic)")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # aten's backward reads -1 as "no padding row" (nn.Embedding has already made a negative index positive)
        padding_idx = -1 if self.padding_idx is None else self.padding_idx
        return _OrderedLookup.apply(ids, self.weight, padding_idx)


def use_ordered_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """Swap a transformers model's input embedding for an OrderedEmbedding holding the same weight Parameter
    (state-dict names, tying and optimizer groups unchanged); in place, returns the model."""
    old = model.get_input_embeddings()
    new = OrderedEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx, max_norm=old.max_norm,
                           norm_type=old.norm_type, scale_grad_by_freq=old.scale_grad_by_freq, sparse=old.sparse,
                           _weight=old.weight)
    new.weight = old.weight  # the very Parameter object (_weight wraps it in a new one): tying and optimizers see it
    model.set_input_embeddings(new)
    return model
