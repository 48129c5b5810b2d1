"""Task vectors: the weight change a finetune made, per layer and module (paper Fig. 8).

A task vector is ``finetuned - base`` for every parameter, keyed by its Hugging Face
name (``model.layers.3.self_attn.q_proj.weight``). :func:`task_vector` computes it
from HF directories, loaded models (a ``TransformerBridge`` or a plain / peft HF
module) or a peft LoRA adapter (``(B @ A) * scaling``, never merged, base optional);
:meth:`TaskVector.norms` and :func:`cosine_similarity` summarise it per layer;
:func:`scaled_task_vector` runs a model at ``base + alpha * delta`` and restores it.

Memory: directories are streamed tensor by tensor with ``safetensors.safe_open``, so
besides the task vector itself (one float32 copy of the changed parameters) at most
one tensor of each model is in memory at a time; loaded models are read in place.
:func:`scaled_task_vector` holds the loaded model, the vector and a copy of only the
parameters it touches. Never three full models.

Example:
    >>> import tempfile, torch
    >>> from piggyback_interp.testing import save_tiny_model, tiny_hf_model
    >>> base = save_tiny_model(tempfile.mkdtemp(), "llama")
    >>> tuned = tiny_hf_model("llama")
    >>> with torch.no_grad():
    ...     _ = tuned.model.layers[1].mlp.down_proj.weight.add_(0.01)
    >>> vector = task_vector(base, tuned)
    >>> list(vector.deltas), vector.layer("model.layers.1.mlp.down_proj.weight")
    (['model.layers.1.mlp.down_proj.weight'], 1)
    >>> round(float(vector.layer_norms().norm.iloc[0]), 4)   # 0.01 * sqrt(64 * 128)
    0.9051
"""

from __future__ import annotations

from piggyback_interp.analysis.task_vectors.apply import apply_task_vector, scaled_task_vector
from piggyback_interp.analysis.task_vectors.compare import cosine_similarity
from piggyback_interp.analysis.task_vectors.names import NON_LAYER, layer_index, module_name
from piggyback_interp.analysis.task_vectors.vector import TaskVector, task_vector

__all__ = [
    "NON_LAYER",
    "TaskVector",
    "apply_task_vector",
    "cosine_similarity",
    "layer_index",
    "module_name",
    "scaled_task_vector",
    "task_vector",
]
