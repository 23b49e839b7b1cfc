"""Upload a saved model folder to the Hugging Face Hub, with a clear message when that is not possible."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import HfApi


class UploadFailed(RuntimeError):
    """The upload did not happen; the message says why and how to retry. The local folder is untouched."""


def push_folder(
    folder: Path,
    repo_id: str,
    private: bool = False,
    commit_message: str = "Upload MedMoE",
    ignore_patterns: list[str] | None = None,
) -> str:
    """Create `repo_id` if needed and upload `folder` to it (less `ignore_patterns`), using the saved login or
    HF_TOKEN.

    Returns the URL of the commit. Raises UploadFailed (never printing the token) when offline or unauthorised.
    """
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, ignore_patterns=ignore_patterns
        )
    except Exception as error:  # network, auth and Hub errors all end the same way: keep the local folder
        reason = type(error).__name__ + (f": {error}" if str(error) else "")
        excluded = "".join(f" --exclude '{pattern}'" for pattern in ignore_patterns or [])
        raise UploadFailed(
            f"Could not upload {folder} to the Hub repo {repo_id!r} ({_without_secrets(reason)}). The model is "
            f"saved locally in {folder}; nothing was lost. Check the network and `hf auth login` (or HF_TOKEN), "
            f"then run: hf upload {repo_id} {folder} .{excluded}"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def _without_secrets(text: str) -> str:
    """Drop anything that looks like a Hub token from an error message."""
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
