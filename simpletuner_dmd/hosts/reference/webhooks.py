"""SimpleTuner's ``webhook_config`` for the reference host: Discord and "raw" (JSON) webhooks for training events.

What is implemented (read from SimpleTuner 4.10.1's ``helpers/webhooks`` and the trainer code that calls it):

* ``webhook_config`` may be what SimpleTuner accepts: nothing (``None``, ``""``, ``"None"``), one target object, a
  list of them, a string holding a JSON object or list, or the path of a JSON file holding either (``~`` is expanded;
  a relative path is taken from ``base_dir`` when given, else the working directory). ``load_webhook_config`` checks
  every target's keys and reports every problem at once, one line each naming its key (``webhook_config[0].log_level:
  …``). Unlike SimpleTuner, a key it does not know, a log level it does not know or a non-boolean ``ssl_no_verify`` is
  an error here, not silently ignored.
* Target keys: ``webhook_type`` ("discord" or "raw", required); ``webhook_url`` (required for discord) or
  ``callback_url`` (required for raw) — when both are set, ``webhook_url`` is used, as in SimpleTuner;
  ``message_prefix`` (discord: shown as ``(prefix)`` in back-ticks before each message; default: the project name,
  which the host passes as "<tracker_project_name> <tracker_run_name>" like SimpleTuner); ``log_level`` (critical,
  error, warning, info or debug, default info: a message is sent when its level is at least that severe);
  ``ssl_no_verify`` (skip TLS certificate checks; ``SIMPLETUNER_SSL_NO_VERIFY=true`` in the environment does the same);
  ``auth_token`` (sent as the ``X-API-Key`` header).
* ``Webhooks.send(event, message, …)`` for the events "start", "checkpoint", "validation", "finish" and "error".
  Discord targets get SimpleTuner's Discord form: a form-encoded ``content`` field ("`(prefix)` message", cut to
  Discord's 2000 characters), or multipart/form-data with ``content`` and the images as ``file0``, ``file1``, …
  (at most 10 a message; more go in further messages with the same text). Raw targets get one JSON object per event,
  shaped like the event SimpleTuner's trainer emits for it (``type``, ``severity``, ``job_id``, ``title``,
  ``message``, ``timestamp``, plus ``data.global_step`` when a step is given):

  - start: ``{"type": "training.status", "title": "Running", "data": {"status": "running"}, …}``
  - checkpoint: ``{"type": "training.checkpoint", "checkpoint": {"path", "label", "is_final": false}, …}``
  - validation: ``{"type": "training.validation", "images": [base64 PNG, …], "videos": [{"src":
    "data:image/gif;base64,…", "mime_type": "image/gif"}, …], …}`` (PNG files as plain base64 strings, as
    SimpleTuner sends images; GIFs as data URIs, as SimpleTuner's validation previews send animations; each key only
    when it has an item)
  - finish: ``{"type": "lifecycle.stage", "stage": {"key": "training_complete", "label": "Training Complete",
    "status": "completed", "progress": {"label", "percent": 100, "current": step}}, …}``
  - error: ``{"type": "notification", "severity": "error", "title": "Fatal Error", "data": {"status": "error"}, …}``;
    an error is filtered as "critical" (as SimpleTuner sends a failed run's events) unless a level is passed.

* A webhook never stops training. Messages are posted from one background thread, in order, so ``send`` returns at
  once; ``close()`` waits for the pending ones (the host calls it at the end of the run; a later ``send`` starts the
  thread again). At most ``max_pending`` (64) messages wait; a further one is dropped with a warning. Each request
  times out after ``timeout`` seconds (5). A network error, time-out, redirect or non-2xx answer prints one warning
  line through ``log`` naming the target's host (never its URL: a Discord webhook URL holds a secret token; nor the
  token) and the run goes on. Redirects are not followed, so the ``X-API-Key`` header never goes to another host.
  An image that cannot be read, or is not a PNG or GIF, is left out with one warning line.

Not implemented: SimpleTuner's progress, lifecycle-stage and per-step metric events (the reference host sends only the
five events above, one message per event where SimpleTuner's trainer sometimes sends two), MP4 video and audio
attachments (``send_video``), and storing the receiver's response headers. Sending from the main process only is the
host's job: build a ``Webhooks`` on the main process alone.

Tested only against a loopback HTTP server (tests/test_webhooks.py); the real Discord API was not reached.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ...config import Key, Schema
from ...errors import ConfigError

WEBHOOK_TYPES = ("discord", "raw")
LEVELS = {"critical": 0, "error": 1, "warning": 2, "info": 3, "debug": 4}  # SimpleTuner's scale: lower is more severe
EVENTS = ("start", "checkpoint", "validation", "finish", "error")
DISCORD_MAX_CONTENT = 2000
DISCORD_MAX_ATTACHMENTS = 10
_USER_AGENT = "simpletuner-dmd-webhooks/0.1"


# --------------------------------------------------------------------------- config


def _url(value: Any) -> str:
    """An http(s) URL with a host. The problem never quotes the value: a webhook URL may hold a secret token."""
    bad = ValueError("must be an http(s) URL like https://host/path (the value is not shown: it may hold a secret)")
    if not isinstance(value, str) or any(c.isspace() or ord(c) < 32 for c in value):
        raise bad
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        raise bad from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise bad
    return value


def _token(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string (the value is not shown: it is a secret)")
    return value


TARGET_SCHEMA = Schema(keys=(
    Key("webhook_type", "str", None, "Where messages go: 'discord' (a Discord channel webhook) or 'raw' (each event "
        "POSTed as JSON to callback_url).", choices=WEBHOOK_TYPES, required=True),
    Key("webhook_url", "str", None, "discord: the channel's webhook URL.", parse=_url, nullable=True),
    Key("callback_url", "str", None, "raw: the URL that receives each event as a JSON POST.", parse=_url,
        nullable=True),
    Key("message_prefix", "str", None, "discord: shown as `(prefix)` before each message; default: the project and "
        "run name.", nullable=True),
    Key("log_level", "str", "info", "The least severe message level sent.", choices=tuple(LEVELS)),
    Key("ssl_no_verify", "bool", False, "Skip TLS certificate checks (a receiver with a self-signed certificate)."),
    Key("auth_token", "str", None, "Sent as the X-API-Key header.", parse=_token, nullable=True),
))


@dataclass(frozen=True)
class WebhookTarget:
    """One validated target. ``url`` and ``auth_token`` stay out of the repr: they may hold secrets."""

    webhook_type: str
    url: str = field(repr=False)
    message_prefix: str | None = None
    log_level: str = "info"
    ssl_no_verify: bool = False
    auth_token: str | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """``host[:port]`` of the URL: what a message about this target may show."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{parts.port}" if parts.port is not None else host

    def wants(self, level: str) -> bool:
        return LEVELS[level] <= LEVELS[self.log_level]


def _json_problem(exc: json.JSONDecodeError) -> str:
    return f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"


def _read_entries(value: Any, base_dir: str | os.PathLike | None) -> tuple[list[Any] | None, list[str]]:
    """The list of raw target entries ``value`` stands for, or the problems that stop reading it."""
    if value is None:
        return [], []
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "None"):
            return [], []
        if text.startswith(("{", "[")):
            try:
                value = json.loads(value)  # unstripped, so a problem's column is the user's
            except json.JSONDecodeError as exc:
                return None, [f"webhook_config: a JSON string that {_json_problem(exc)}"]
            except RecursionError:
                return None, ["webhook_config: a JSON string that nests too deeply to read"]
            what = "webhook_config: the JSON string"
        else:
            path = Path(os.path.expanduser(value))
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None, [f"webhook_config: {path}: not found"]
            except (OSError, UnicodeDecodeError) as exc:
                return None, [f"webhook_config: {path}: cannot be read ({exc})"]
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                return None, [f"webhook_config: {path}: {_json_problem(exc)}"]
            except RecursionError:
                return None, [f"webhook_config: {path}: nests too deeply to read"]
            what = f"webhook_config: {path}"
        if not isinstance(value, (dict, list)):
            return None, [f"{what} must hold an object or a list of objects, got {type(value).__name__}"]
    if isinstance(value, dict):
        return [value], []
    if isinstance(value, (list, tuple)):
        return list(value), []
    return None, [f"webhook_config: must be an object, a list of objects, a JSON string or the path of a JSON file, "
                  f"got {type(value).__name__}"]


def load_webhook_config(value: Any, *, base_dir: str | os.PathLike | None = None) -> list[WebhookTarget]:
    """The targets ``webhook_config`` names (an empty list for none); raises ``ConfigError`` with every problem."""
    entries, problems = _read_entries(value, base_dir)
    if entries is None:
        raise ConfigError(problems)
    targets: list[WebhookTarget] = []
    for i, entry in enumerate(entries):
        prefix = f"webhook_config[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{prefix}: must be an object, got {type(entry).__name__}")
            continue
        values, entry_problems, _ = TARGET_SCHEMA.validate(entry, prefix=prefix, unknown="error")
        problems.extend(entry_problems)
        kind = entry.get("webhook_type")
        if kind == "discord" and entry.get("webhook_url") is None:
            problems.append(f"{prefix}.webhook_url: required for a discord target (the channel's webhook URL)")
        elif kind == "raw" and entry.get("callback_url") is None:
            problems.append(f"{prefix}.callback_url: required for a raw target (the URL that receives the events)")
        if entry_problems or kind not in WEBHOOK_TYPES:
            continue
        targets.append(WebhookTarget(
            webhook_type=kind,
            url=values["webhook_url"] or values["callback_url"],
            message_prefix=values["message_prefix"],
            log_level=values["log_level"],
            ssl_no_verify=values["ssl_no_verify"],
            auth_token=values["auth_token"],
        ))
    if problems:
        raise ConfigError(problems)
    return targets


# --------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class _Image:
    data: bytes
    mime: str  # "image/png" or "image/gif"


@dataclass(frozen=True)
class _Post:
    target: WebhookTarget
    body: bytes
    content_type: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: following it could send the X-API-Key header (or the message) to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None


def _multipart(fields: Sequence[tuple[str, str]], files: Sequence[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    """multipart/form-data of text ``fields`` (name, value) and ``files`` (name, filename, mime, data)."""
    chunks = [value.encode("utf-8") for _, value in fields] + [data for *_, data in files]
    boundary = uuid.uuid4().hex
    while any(boundary.encode() in c for c in chunks):  # pragma: no cover - 128 random bits
        boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode()
        out += value.encode("utf-8") + b"\r\n"
    for name, filename, mime, data in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {mime}\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


class Webhooks:
    """Sends training events to the targets of ``load_webhook_config``; see the module docstring for the payloads.

    ``Webhooks(targets, project_name=..., job_id=..., log=print, timeout=5.0, background=True)``. With
    ``background=False`` each ``send`` posts before it returns (each request still bounded by ``timeout``).
    """

    def __init__(self, targets: Iterable[WebhookTarget], *, project_name: str = "simpletuner-dmd",
                 job_id: str | None = None, log: Callable[[str], Any] = print, timeout: float = 5.0,
                 background: bool = True, max_pending: int = 64):
        self.targets = tuple(targets)
        self.project_name = project_name
        self.job_id = job_id
        self.log = log
        self.timeout = float(timeout)
        self.background = background
        env_no_verify = os.environ.get("SIMPLETUNER_SSL_NO_VERIFY", "false").lower() == "true"
        self._openers = {}
        for target in self.targets:
            context = ssl.create_default_context()
            if target.ssl_no_verify or env_no_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._openers[id(target)] = urllib.request.build_opener(
                _NoRedirect, urllib.request.HTTPSHandler(context=context))
        self._queue: queue.Queue[_Post | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.targets)

    def __enter__(self) -> Webhooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- public

    def send(self, event: str, message: str, *, step: int | None = None,
             images: str | os.PathLike | Iterable[str | os.PathLike] = (), level: str | None = None,
             path: str | os.PathLike | None = None) -> None:
        """Send ``message`` about ``event`` to every target whose ``log_level`` lets ``level`` through.

        ``level`` defaults to "critical" for "error" (as SimpleTuner filters a failed run's events) and "info" for the
        others. ``images`` are PNG or GIF files to attach (Discord) or embed (raw). ``path`` is the checkpoint folder
        for "checkpoint" (``checkpoint.path`` of the raw event); for other events it goes to the raw event's
        ``data.path``. Never raises for a network problem: it prints one warning line instead."""
        if event not in EVENTS:
            raise ValueError(f"unknown webhook event {event!r}; one of {', '.join(EVENTS)}")
        if level is not None and level not in LEVELS:
            raise ValueError(f"unknown webhook level {level!r}; one of {', '.join(LEVELS)}")
        filter_level = level or ("critical" if event == "error" else "info")
        targets = [t for t in self.targets if t.wants(filter_level)]
        if not targets:
            return
        message = str(message)
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        loaded = self._read_images(images)
        posts: list[_Post] = []
        raw_body = None
        for target in targets:
            if target.webhook_type == "discord":
                posts.extend(self._discord_posts(target, message, loaded))
            else:
                if raw_body is None:
                    raw_body = json.dumps(self._raw_event(event, message, step=step, level=level, path=path,
                                                          images=loaded), default=str).encode("utf-8")
                posts.append(_Post(target, raw_body, "application/json"))
        for post in posts:
            if self.background:
                self._enqueue(post)
            else:
                self._post(post)

    def close(self, timeout: float | None = None) -> None:
        """Wait for the pending messages (at most ``timeout`` seconds when given) and stop the sending thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None or not thread.is_alive():
            return
        self._queue.put(None)
        thread.join(timeout)

    # ---------------------------------------------------------------- payloads

    def _read_images(self, images: Iterable[str | os.PathLike]) -> list[_Image]:
        out = []
        for image in images:
            file = Path(image)
            try:
                data = file.read_bytes()
            except OSError as exc:
                self.log(f"warning: webhook image {file} not sent: cannot be read ({exc.strerror or exc})")
                continue
            if data.startswith(b"\x89PNG\r\n\x1a\n"):
                out.append(_Image(data, "image/png"))
            elif data[:6] in (b"GIF87a", b"GIF89a"):
                out.append(_Image(data, "image/gif"))
            else:
                self.log(f"warning: webhook image {file} not sent: not a PNG or GIF file")
        return out

    def _discord_posts(self, target: WebhookTarget, message: str, images: list[_Image]) -> list[_Post]:
        prefix = target.message_prefix if target.message_prefix is not None else self.project_name
        content = f"`({prefix})` {message}"
        if len(content) > DISCORD_MAX_CONTENT:
            content = content[:DISCORD_MAX_CONTENT - 1] + "…"
        if not images:
            body = urllib.parse.urlencode({"content": content}).encode("ascii")
            return [_Post(target, body, "application/x-www-form-urlencoded")]
        posts = []
        for start in range(0, len(images), DISCORD_MAX_ATTACHMENTS):
            chunk = images[start:start + DISCORD_MAX_ATTACHMENTS]
            files = [(f"file{i}", f"image{i}.{img.mime.split('/')[1]}", img.mime, img.data)
                     for i, img in enumerate(chunk)]
            body, content_type = _multipart([("content", content)], files)
            posts.append(_Post(target, body, content_type))
        return posts

    def _raw_event(self, event: str, message: str, *, step: int | None, level: str | None,
                   path: str | os.PathLike | None, images: list[_Image]) -> dict[str, Any]:
        title = message.splitlines()[0] if message.strip() else event
        data: dict[str, Any] = {}
        payload: dict[str, Any] = {"severity": level or "info", "job_id": self.job_id, "title": title,
                                   "message": message}
        if event == "start":
            payload.update(type="training.status", title="Running")
            data["status"] = "running"
        elif event == "checkpoint":
            payload.update(type="training.checkpoint",
                           checkpoint={"path": None if path is None else os.fspath(path), "label": message,
                                       "is_final": False})
        elif event == "validation":
            payload["type"] = "training.validation"
        elif event == "finish":
            progress: dict[str, Any] = {"label": "Training Complete", "percent": 100}
            if step is not None:
                progress["current"] = step
            payload.update(type="lifecycle.stage", stage={"key": "training_complete", "label": "Training Complete",
                                                          "status": "completed", "progress": progress})
        else:  # error
            payload.update(type="notification", severity=level or "error", title="Fatal Error")
            data["status"] = "error"
        if step is not None:
            data["global_step"] = step
        if path is not None and event != "checkpoint":
            data["path"] = os.fspath(path)
        if data:
            payload["data"] = data
        pngs = [base64.b64encode(i.data).decode("ascii") for i in images if i.mime == "image/png"]
        gifs = [{"src": "data:image/gif;base64," + base64.b64encode(i.data).decode("ascii"), "mime_type": "image/gif"}
                for i in images if i.mime == "image/gif"]
        if pngs:
            payload["images"] = pngs
        if gifs:
            payload["videos"] = gifs
        payload["timestamp"] = datetime.now(tz=timezone.utc).isoformat()
        return payload

    # ---------------------------------------------------------------- transport

    def _enqueue(self, post: _Post) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="webhooks", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(post)
        except queue.Full:
            self._warn(post.target, f"message dropped: {self._queue.maxsize} messages already waiting")

    def _work(self) -> None:
        while True:
            post = self._queue.get()
            if post is None:
                return
            self._post(post)

    def _post(self, post: _Post) -> None:
        target = post.target
        headers = {"Content-Type": post.content_type, "User-Agent": _USER_AGENT}
        if target.auth_token:
            headers["X-API-Key"] = target.auth_token
        request = urllib.request.Request(target.url, data=post.body, headers=headers, method="POST")
        try:
            with self._openers[id(target)].open(request, timeout=self.timeout) as response:
                response.read(65536)
        except urllib.error.HTTPError as exc:  # a non-2xx answer, a redirect included
            exc.close()
            self._warn(target, f"the receiver answered HTTP {exc.code} {exc.reason}")
        except urllib.error.URLError as exc:
            reason = exc.reason
            self._warn(target, f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else reason)
        except (TimeoutError, http.client.HTTPException, OSError) as exc:
            self._warn(target, f"{type(exc).__name__}: {exc}")

    def _warn(self, target: WebhookTarget, problem: Any) -> None:
        text = " ".join(str(problem).split())  # one line
        parts = urllib.parse.urlsplit(target.url)
        secrets = [target.url, parts.path, parts.query, target.auth_token]
        for secret in secrets:
            if secret and len(secret) > 1:
                text = text.replace(secret, "<redacted>")
        if len(text) > 300:
            text = text[:297] + "..."
        self.log(f"warning: {target.webhook_type} webhook to {target.host} failed ({text}); training goes on")
