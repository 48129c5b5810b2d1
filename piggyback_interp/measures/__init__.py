"""Measures: how a behaviour is scored.

Logit metrics read from a forward (``metrics``), text detectors on generated answers
(``detectors``), LLM judges (``judges``), the narrow settings with their detectors
(``settings``) and evaluation of a model on a setting (``evaluation``).
"""
