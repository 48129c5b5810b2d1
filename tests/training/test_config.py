"""FinetuneConfig: its checks, and its string options as enums."""

import pytest

from piggyback_interp.core.errors import UserError
from piggyback_interp.training import FinetuneConfig
from piggyback_interp.training.config import Export, Method, PostfixReference, Precision
from piggyback_interp.training.treft import Region, Variant


def test_config_errors():
    with pytest.raises(ValueError, match="method must be one of sft, treft, interleave"):
        FinetuneConfig(method="dpo")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        FinetuneConfig(batch_size=0)


def _from_saved(cls, config):
    """``config`` written as JSON (as run.json / finetune.json keep it) and read back."""
    import dataclasses
    import json

    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    return saved, cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("method", Method),
        ("treft_region", Region),
        ("postfix_reference", PostfixReference),
        ("kv_variant", Variant),
        ("mixed_precision", Precision),
        ("export", Export),
    ],
)
def test_string_options_are_enums_given_as_strings_or_members(field, kind):
    for member in kind:
        by_string = FinetuneConfig(**{field: member.value})
        assert (
            by_string == FinetuneConfig(**{field: member}) and getattr(by_string, field) is member
        )
        saved, again = _from_saved(FinetuneConfig, by_string)  # a checkpoint resumes either way
        assert type(saved[field]) is str and saved[field] == member.value and again == by_string
    choices = ", ".join(m.value for m in kind)
    with pytest.raises(UserError, match=f"^{field} must be one of {choices}, got 'bogus'$"):
        FinetuneConfig(**{field: "bogus"})
