"""publish() under torch.distributed: ranks other than 0 write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtune.errors import PublishError
from mixtune.publish import publish


def test_non_zero_rank_returns_without_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    dest = tmp_path / "out"
    # Even a push without repo_id (an error on rank 0) is rank 0's to report.
    res = publish(object(), dest, push_to_hub=True)
    assert res.skipped_rank == 1
    assert res.files == ()
    assert res.dest == dest
    assert list(tmp_path.iterdir()) == []


def test_rank_zero_still_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    with pytest.raises(PublishError, match="repo_id"):
        publish(object(), tmp_path / "out", push_to_hub=True)
