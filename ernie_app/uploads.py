"""The upload size limit. Gradio enforces it where files come in (the page refuses a larger file
before sending it, its /upload route answers 413), but a file an API caller gives as a URL is
downloaded by Gradio without any limit, so the /image and /video endpoints check what they got."""
from __future__ import annotations

import os

import gradio as gr

from .engine import UserError
from .turns import refuse

MB = 2**20


def check_upload(path: str | None, max_bytes: int | None, where: str) -> None:
    """Raise a readable gr.Error (logged as a refusal) when the file at `path` is larger than
    `max_bytes`; None means no file, or no limit."""
    if path is None or max_bytes is None or (size := os.path.getsize(path)) <= max_bytes:
        return
    error = UserError(f"{os.path.basename(path)!r} is {size / MB:.1f} MB; files are limited to {max_bytes / MB:g} MB.")
    raise gr.Error(refuse(error, where), print_exception=False)
