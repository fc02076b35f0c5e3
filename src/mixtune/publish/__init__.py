"""Publishing: a trained adapter as a self-describing folder, merged weights, Hub upload.

:func:`publish` writes the PEFT adapter, tokenizer, schema-versioned spec
JSON and a model card; :func:`spec_to_dict`/:func:`spec_from_dict` are the
JSON (de)serialisation of mixtune's specs.
"""

from __future__ import annotations

from mixtune.publish._publish import MERGE_TOLERANCE, PublishResult, publish
from mixtune.publish._specs import SCHEMA_VERSION, spec_from_dict, spec_to_dict

__all__ = [
    "MERGE_TOLERANCE",
    "SCHEMA_VERSION",
    "PublishResult",
    "publish",
    "spec_from_dict",
    "spec_to_dict",
]
