"""Triton kernels, on the ground floor: they import no other llmopt package, so the model and the optimizers both
build on them without importing each other.

  common    the Triton import and interpreter switch, launch shapes, address tables, shared Triton helpers
  rows      SCALE: row- and column-normalized updates
  clipped   SGD-LL: the momentum with its sums of squares, then the clipped update
  ema       EMA-Nesterov: the lookahead momentum
  muon      Muon: the bf16 update stack and its per-matrix division
(the model's cross-entropy kernel sits with its autograd function in llmopt/model/cross_entropy.py, on common)
"""
