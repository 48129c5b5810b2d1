"""Positions of segments in padded batches, checked by hand."""

import torch

from piggyback_interp.core.spans import batch_spans, render_prompts
from piggyback_interp.interventions.activations import columns_mask, segment_positions
from piggyback_interp.testing import tiny_model

QUESTIONS = ["Hi", "Can my landlord keep my deposit after I move out?"]


def test_columns_mask_shifts_each_row_by_its_padding_and_allows_unequal_counts():
    tok = tiny_model("llama").tokenizer
    unpadded = render_prompts(tok, QUESTIONS)
    for align in ("left", "prefix"):
        batch = batch_spans(tok, unpadded, align=align)
        per_row = [[0, 2], [1]]
        mask = columns_mask(batch, per_row)
        assert mask.shape == batch.input_ids.shape and mask.sum().item() == 3
        for row, positions in enumerate(per_row):
            ids = [batch.input_ids[row, c].item() for c in mask[row].nonzero().flatten()]
            assert ids == [unpadded[row].input_ids[p] for p in positions]
        # the query columns: the same as the batch's own segment mask
        queries = [list(s.query) for s in unpadded]
        assert torch.equal(columns_mask(batch, queries), batch.segment_mask("query"))
        # equal counts: the same columns as segment_positions
        prefix = [list(s.prefix) for s in unpadded]
        cols = segment_positions(batch, "prefix")
        assert torch.equal(columns_mask(batch, prefix).nonzero()[:, 1], cols.flatten())
