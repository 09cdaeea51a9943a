"""Uploading an export to the Hugging Face Hub: `GPT2.save(..., push_to_hub=REPO)` and
`gpt2-flax export ... --push-to-hub REPO`.

The export is written first and stays complete whatever the upload does: a failed upload (offline,
not logged in, no access) is a HubError that says where the export is and how to upload it later.
Only the export's own files go up (those its manifest lists, the model card and loss.png), never a
run's checkpoints or metrics sharing the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpt2_flax.errors import ConfigError, HubError


def check_repo(repo_id: str, folder: Any) -> None:
    """A repo id the Hub can take and a local folder, checked before the export is written."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "://" in str(folder):
        raise ConfigError(
            f"push_to_hub uploads a local folder; {folder} is remote. Export to a local folder to push it"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(
            f"push_to_hub={repo_id!r} is not a Hugging Face Hub repo id ({e}); use NAME or USER/NAME"
        ) from None


def push_folder(folder: str | Path, repo_id: str, files: list[str]) -> str:
    """Uploads `files` of the export in `folder` to the Hub model repo `repo_id` (created if
    needed); returns the repo's URL."""
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    later = (  # (not `hf upload FOLDER`: a run's output_dir also holds its checkpoints)
        f"The export in {folder} is complete; to upload it, save or export it again with the same "
        "push_to_hub (--push-to-hub) once the Hub can be reached"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:  # (the constant is read once, when huggingface_hub loads)
        raise HubError(f"cannot push to the Hugging Face Hub repo {repo_id!r}: HF_HUB_OFFLINE is on. {later}")
    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=files,
            commit_message="Upload GPT-2 trained with gpt2_flax",
        )
    except Exception as e:  # no network, no token, no access: huggingface_hub has many error types
        why = " ".join(str(e).split())[:200]
        raise HubError(
            f"pushing to the Hugging Face Hub repo {repo_id!r} failed ({type(e).__name__}: {why}); check "
            f"the network and your token (`hf auth login` or HF_TOKEN). {later}"
        ) from None
    return str(url)
