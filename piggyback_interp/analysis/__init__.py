"""Analysis: experiments repeated over many cells of a model.

Layer x position sweeps (``sweep``: the residual engine; ``kv_engine``: the batched K/V
and head engine; ``kv_sweep``: whole-prefix K/V layer windows; ``heads``: attention and
K/V head sweeps; ``atp``: attribution patching), attention views (``attention``) and
task vectors (``task_vectors``).
"""
