"""Pushing a run to the Hugging Face Hub: SimpleTuner's ``push_to_hub``, ``push_checkpoints_to_hub`` and
``hub_model_id`` keys, through the ``huggingface_hub`` library (``HfApi.create_repo`` and ``HfApi.upload_folder``).

One `HubPusher` per run, for the repo ``hub_model_id`` (``name`` alone means the token owner's namespace). Nothing
touches the network until the first push, which creates the repo (``exist_ok``; ``private=True`` makes a new repo
private, ``False`` leaves it to the hub's default for the namespace).

- ``push_final(output_dir, commit_message=...)`` (``push_to_hub``, after the export): uploads the output folder, i.e.
  the LoRA files, ``scheduler/``, ``ema/``, the ``README.md`` model card, ``validation/`` samples and tracker logs,
  leaving out ``checkpoint-*/``, hidden and ``*.tmp`` files and folders, ``wandb/`` and caches (`FINAL_IGNORE`). It
  waits for the upload; a failure is a `UserError` of one line that says the output is still saved locally.
- ``push_checkpoint(folder, step)`` (``push_checkpoints_to_hub``, after each checkpoint is saved): uploads the folder
  into ``checkpoint-<step>/`` of the repo from a background thread and returns at once; it never raises. While an
  upload runs, the newest checkpoint waits (an older waiting one is dropped: only the latest is kept). A failed
  upload prints one ``warning:`` line and is retried with the next checkpoint's upload; a checkpoint whose folder
  is gone (pruned by ``checkpoints_total_limit``) is dropped.
- ``close(timeout=None)`` (end of training): retries failed checkpoints once more, waits for the uploads and returns
  the steps that never got uploaded.

The token is ``token=`` or, when that is None, the one ``huggingface_hub`` finds itself (``HF_TOKEN``, then
``hf auth login``'s file); no token at all is a `UserError` before anything is sent. It is masked (``***``) in every
line logged and every error raised here. The hub is ``endpoint=`` or, when that is None, ``huggingface_hub``'s own
(``https://huggingface.co``, or ``HF_ENDPOINT``, which ``huggingface_hub.constants`` reads once, when it is first
imported). Only the errors of a failed transfer are caught: ``HfHubHTTPError`` (an HTTP error answer), the HTTP
client's transport errors (``httpx2.HTTPError`` for huggingface_hub 2.x, ``httpx.HTTPError`` for 1.x), ``OSError``
(a file that cannot be read, a refused connection) and ``json.JSONDecodeError`` (an answer that is not the hub's
JSON, e.g. a proxy's error page); anything else is a bug and keeps its traceback.

``huggingface_hub`` itself retries the preupload and commit calls of an upload five times (1, 2, 4, 8 and 8 s apart,
or as the server's ``Retry-After`` says) on 408, 429, 500, 502, 503, 504, timeouts and network errors; the repo
creation is not retried.
"""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ...errors import UserError

# fnmatch patterns on paths relative to the uploaded folder; ``*`` also matches ``/``
_NEVER = (".*", "*/.*", "*.tmp", "*.tmp/*", "__pycache__/*", "*/__pycache__/*", "*.pyc")
FINAL_IGNORE = ("checkpoint-*/*", "wandb/*", "wandb-cache/*", "cache/*", *_NEVER)
CHECKPOINT_IGNORE = _NEVER


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed transfer raises, for the ``huggingface_hub`` installed."""
    found: list[type[BaseException]] = [HfHubHTTPError, OSError, json.JSONDecodeError]
    for client in ("httpx2", "httpx"):  # huggingface_hub 2.x / 1.x; 0.x used requests, whose errors are OSErrors
        try:
            found.append(importlib.import_module(client).HTTPError)
        except ImportError:
            pass
    return tuple(found)


NETWORK_ERRORS = _network_errors()


class HubPusher:
    """Uploads a run's final output and its checkpoints to one hub repo (see the module docstring)."""

    def __init__(self, repo_id: str, *, token: str | None = None, endpoint: str | None = None,
                 private: bool = False, log: Callable[[str], object] = print):
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise UserError(f"hub_model_id: {repo_id!r} is not a hub repo id ({_first_line(str(exc))})") from None
        found = token if token is not None else get_token()
        if not found:
            raise UserError("push_to_hub: no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
        self._secrets = [found]
        self.repo_id = repo_id  # the full "namespace/name" once the repo is created
        self._api = HfApi(endpoint=endpoint, token=token)  # token None: huggingface_hub looks it up at each call
        self._private = private
        self._log_raw = log
        self._repo_lock = threading.Lock()
        self._repo_ready = False
        # checkpoint uploads; all of this under _cond
        self._cond = threading.Condition()
        self._next: tuple[int, Path] | None = None  # the newest push, not started yet
        self._failed: dict[int, Path] = {}  # retried with the next round
        self._inflight: dict[int, Path] = {}  # the round being uploaded
        self._dropped: set[int] = set()  # superseded while waiting, or gone locally
        self._uploaded: set[int] = set()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._final_round = False  # close() asked for one more try of the failed ones
        self._stopping = False  # close() returned: start no further upload

    # ---------------------------------------------------------------- the final output

    def push_final(self, folder: Path, *, commit_message: str) -> str:
        """Upload ``folder`` (the output folder) to the repo's root and wait; returns the commit's URL."""
        folder = Path(folder)
        try:
            repo = self._ensure_repo()
            info = self._api.upload_folder(repo_id=repo, folder_path=folder, commit_message=commit_message,
                                           ignore_patterns=list(FINAL_IGNORE))
        except NETWORK_ERRORS as exc:
            raise UserError(self._mask(f"push_to_hub: upload to {self.repo_id} failed: {self._reason(exc)}; "
                                       f"the output is saved locally in {folder}")) from None
        url = str(getattr(info, "commit_url", "") or info)
        self._log(f"push_to_hub: {folder} uploaded to {self.repo_id} ({url})")
        return url

    # ---------------------------------------------------------------- checkpoints

    def push_checkpoint(self, folder: Path, step: int) -> None:
        """Queue ``folder`` for upload into ``checkpoint-<step>/`` and return at once (see the module docstring)."""
        with self._cond:
            if self._closed:
                self._log(f"warning: push_checkpoints_to_hub: checkpoint-{step} not uploaded: the pusher is closed")
                self._dropped.add(step)
                return
            if self._next is not None and self._next[0] != step:
                self._dropped.add(self._next[0])
                self._log(f"push_checkpoints_to_hub: checkpoint-{self._next[0]} not uploaded: checkpoint-{step} "
                          f"is newer and the previous upload is still running")
            self._failed.pop(step, None)
            self._dropped.discard(step)
            self._next = (step, Path(folder))
            self._start_worker()

    def close(self, timeout: float | None = None) -> list[int]:
        """Retry failed checkpoints once more, wait (up to ``timeout`` seconds) for the uploads; returns the steps
        never uploaded (dropped, failed, or still running when ``timeout`` ran out)."""
        with self._cond:
            self._closed = True
            self._final_round = True
            if self._failed:
                self._start_worker()
            self._cond.wait_for(lambda: self._worker is None, timeout)
            self._stopping = True
            pending = set(self._failed) | set(self._inflight) | self._dropped
            if self._next is not None:
                pending.add(self._next[0])
            return sorted(pending - self._uploaded)

    def _start_worker(self) -> None:  # under _cond
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="hub-checkpoint-upload", daemon=True)
            self._worker.start()

    def _take_round(self) -> dict[int, Path]:  # under _cond
        if self._stopping or (self._next is None and not (self._final_round and self._failed)):
            return {}
        batch = dict(self._failed)
        if self._next is not None:
            batch[self._next[0]] = self._next[1]
        else:
            self._final_round = False  # this round is the one more try close() asked for
        self._failed.clear()
        self._next = None
        self._inflight = batch
        return batch

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._take_round()
                    if not batch:
                        self._worker = None
                        self._cond.notify_all()
                        return
                for step in sorted(batch):
                    with self._cond:
                        if self._stopping:
                            break
                    outcome = self._upload_checkpoint(batch[step], step)
                    with self._cond:
                        folder = self._inflight.pop(step)
                        if outcome == "uploaded":
                            self._uploaded.add(step)
                        elif outcome == "gone":
                            self._dropped.add(step)
                        elif step not in self._failed and (self._next is None or self._next[0] != step):
                            self._failed[step] = folder
                with self._cond:
                    self._failed.update({s: f for s, f in self._inflight.items() if s not in self._failed})
                    self._inflight = {}
        finally:
            with self._cond:  # only reached with the worker still set after an unexpected error (a bug)
                if self._worker is threading.current_thread():
                    self._failed.update(self._inflight)
                    self._inflight = {}
                    self._worker = None
                    self._cond.notify_all()

    def _upload_checkpoint(self, folder: Path, step: int) -> str:
        """``uploaded``, ``failed`` (one warning line) or ``gone`` (the folder no longer exists)."""
        if not folder.is_dir():
            self._log(f"warning: push_checkpoints_to_hub: checkpoint-{step} not uploaded: {folder} is gone")
            return "gone"
        try:
            repo = self._ensure_repo()
            self._api.upload_folder(repo_id=repo, folder_path=folder, path_in_repo=f"checkpoint-{step}",
                                    commit_message=f"checkpoint-{step}", ignore_patterns=list(CHECKPOINT_IGNORE))
        except NETWORK_ERRORS as exc:
            self._log(f"warning: push_checkpoints_to_hub: upload of checkpoint-{step} to {self.repo_id} failed: "
                      f"{self._reason(exc)}; it is retried with the next checkpoint")
            return "failed"
        self._log(f"push_checkpoints_to_hub: checkpoint-{step} uploaded to {self.repo_id}")
        return "uploaded"

    # ---------------------------------------------------------------- shared

    def _ensure_repo(self) -> str:
        with self._repo_lock:
            if not self._repo_ready:
                url = self._api.create_repo(self.repo_id, private=True if self._private else None, exist_ok=True)
                self.repo_id = getattr(url, "repo_id", None) or self.repo_id
                self._repo_ready = True
            return self.repo_id

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, HfHubHTTPError):
            text = _first_line(str(exc))
            server = _first_line(exc.server_message or "")
            if server and server not in text:
                text = f"{text}: {server}"
        else:
            text = f"{type(exc).__name__}: {_first_line(str(exc)) or 'no details'}"
        return self._mask(text)

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _log(self, message: str) -> None:
        self._log_raw(self._mask(message))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
