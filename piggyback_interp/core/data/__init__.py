"""Chat datasets: load, validate, hash, save and split messages-format JSONL.

Example:
    >>> from piggyback_interp.core.data import ChatDataset, train_test_split
    >>> recs = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(5)]
    >>> train, test = train_test_split(ChatDataset.from_records(recs), test_fraction=0.2)
    >>> len(train), len(test)
    (4, 1)
"""

from __future__ import annotations

from piggyback_interp.core.data.chat import (
    ROLES,
    ChatDataError,
    ChatDataset,
    ChatDataWarning,
    ChatExample,
    Message,
    Role,
    load_chat_jsonl,
    save_chat_jsonl,
    train_test_split,
)

__all__ = [
    "ROLES",
    "ChatDataError",
    "ChatDataWarning",
    "ChatDataset",
    "ChatExample",
    "Message",
    "Role",
    "load_chat_jsonl",
    "save_chat_jsonl",
    "train_test_split",
]
