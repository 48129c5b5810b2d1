"""Core: the model and its chat template, and the plumbing every tier uses.

Loading models and pairs (``models``, ``embedded``), the chat template's spans
(``spans``), hook names (``hooks``, the only module that spells them), Hugging Face
internals (``hf``, the only module that reaches them), chat data (``data``), atomic
I/O and checkpoints (``io``), run folders (``runs``), errors and checks, provenance,
distributed helpers and notebook display helpers.
"""
