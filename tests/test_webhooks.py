"""The reference host's webhooks (SimpleTuner's ``webhook_config``), against a loopback HTTP receiver."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import socket
import threading
import time
import urllib.parse
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from simpletuner_dmd.errors import ConfigError
from simpletuner_dmd.hosts.reference.webhooks import WebhookTarget, Webhooks, load_webhook_config

DISCORD_TOKEN = "dIsCoRdSeCrEtToKeN0123456789"
API_KEY = "api-key-never-printed-42"


class Receiver:
    """A ThreadingHTTPServer on 127.0.0.1 that records every request. Paths starting with /fail answer 500, /slow
    answers after 1.5 s, /redirect answers 302 (to /raw/elsewhere); every other path answers 204."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append({"method": "POST", "path": self.path, "body": body,
                                              "headers": {k.lower(): v for k, v in self.headers.items()}})
                if self.path.startswith("/fail"):
                    self.send_error(500)
                    return
                if self.path.startswith("/slow"):
                    time.sleep(1.5)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", "/raw/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, prefix: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"].startswith(prefix)]


@pytest.fixture()
def receiver(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture()
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused
    return port


def discord_path(name: str = "discord") -> str:
    return f"/{name}/api/webhooks/1234567890/{DISCORD_TOKEN}"


def write_png(path: Path, color=(255, 0, 0), size=(8, 6)) -> Path:
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def write_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return path


def form_content(request: dict) -> str:
    assert request["headers"]["content-type"] == "application/x-www-form-urlencoded"
    fields = urllib.parse.parse_qs(request["body"].decode("ascii"), strict_parsing=True)
    assert list(fields) == ["content"] and len(fields["content"]) == 1
    return fields["content"][0]


def multipart_parts(request: dict) -> list:
    content_type = request["headers"]["content-type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + request["body"])
    assert message.is_multipart()
    return list(message.iter_parts())


def part_name(part) -> str:
    return part.get_param("name", header="content-disposition")


def raw_json(request: dict) -> dict:
    assert request["headers"]["content-type"] == "application/json"
    return json.loads(request["body"])


# --------------------------------------------------------------------------- config


def test_config_file_with_a_raw_and_a_discord_target(tmp_path, receiver):
    config = [
        {"webhook_type": "raw", "callback_url": receiver.url("/raw/events"), "log_level": "debug",
         "auth_token": API_KEY, "ssl_no_verify": True},
        {"webhook_type": "discord", "webhook_url": receiver.url(discord_path()), "message_prefix": "my-run"},
    ]
    (tmp_path / "hooks").mkdir()
    file = tmp_path / "hooks" / "webhook.json"
    file.write_text(json.dumps(config))

    for targets in (load_webhook_config(str(file)), load_webhook_config(file),
                    load_webhook_config("hooks/webhook.json", base_dir=tmp_path)):
        raw, discord = targets
        assert raw == WebhookTarget("raw", receiver.url("/raw/events"), None, "debug", True, API_KEY)
        assert discord == WebhookTarget("discord", receiver.url(discord_path()), "my-run", "info", False, None)
        assert raw.host == discord.host == f"127.0.0.1:{receiver.port}"
        for target in targets:  # the repr never shows a URL or a token
            assert DISCORD_TOKEN not in repr(target) and API_KEY not in repr(target) and "/raw/" not in repr(target)


def test_every_form_simpletuner_accepts(tmp_path):
    one = {"webhook_type": "raw", "callback_url": "https://example.com/cb"}
    assert load_webhook_config(None) == load_webhook_config("") == load_webhook_config("None") == []
    assert load_webhook_config([]) == []
    expected = [WebhookTarget("raw", "https://example.com/cb")]
    assert load_webhook_config(one) == expected
    assert load_webhook_config(json.dumps(one)) == expected  # a JSON string, as SimpleTuner's config.json holds it
    assert load_webhook_config(json.dumps([one, one])) == expected * 2
    (tmp_path / "one.json").write_text(json.dumps(one))  # a file holding one object
    assert load_webhook_config(str(tmp_path / "one.json")) == expected
    # SimpleTuner takes webhook_url before callback_url when both are set
    both = load_webhook_config({"webhook_type": "raw", "callback_url": "http://a.example/x",
                                "webhook_url": "http://b.example/y"})
    assert both[0].url == "http://b.example/y"


def test_bad_configs_report_every_problem_at_once():
    secret_url = f"ftp://example.com/api/webhooks/1/{DISCORD_TOKEN}"
    with pytest.raises(ConfigError) as info:
        load_webhook_config([
            {"webhook_type": "slack", "callback_url": secret_url},
            {"webhook_type": "discord"},
            "not an object",
            {"webhook_type": "raw", "callback_url": "http://example.com/cb", "log_level": "loud", "colour": "red",
             "ssl_no_verify": "yes", "auth_token": 12345},
            {"callback_url": "http://example.com/cb"},
            {"webhook_type": "raw"},
            {"webhook_type": "discord", "webhook_url": "https://"},
        ])
    problems = info.value.problems
    url_problem = "must be an http(s) URL like https://host/path (the value is not shown: it may hold a secret)"
    assert problems == [
        "webhook_config[0].webhook_type: must be one of 'discord', 'raw', got 'slack'",
        f"webhook_config[0].callback_url: {url_problem}",
        "webhook_config[1].webhook_url: required for a discord target (the channel's webhook URL)",
        "webhook_config[2]: must be an object, got str",
        "webhook_config[3].log_level: must be one of 'critical', 'error', 'warning', 'info', 'debug', got 'loud'",
        "webhook_config[3].colour: unknown key",
        "webhook_config[3].ssl_no_verify: must be true or false, got str 'yes'",
        "webhook_config[3].auth_token: must be a non-empty string (the value is not shown: it is a secret)",
        "webhook_config[4].webhook_type: required (Where messages go: 'discord' (a Discord channel webhook) or 'raw' "
        "(each event POSTed as JSON to callback_url))",
        "webhook_config[5].callback_url: required for a raw target (the URL that receives the events)",
        f"webhook_config[6].webhook_url: {url_problem}",
    ]
    text = str(info.value)
    assert DISCORD_TOKEN not in text and "12345" not in text


def test_bad_sources_name_the_file_and_the_problem(tmp_path):
    def problems(value, **kw) -> list[str]:
        with pytest.raises(ConfigError) as info:
            load_webhook_config(value, **kw)
        return info.value.problems

    missing = tmp_path / "webhook.json"
    assert problems(str(missing)) == [f"webhook_config: {missing}: not found"]
    assert problems("webhook.json", base_dir=tmp_path) == [f"webhook_config: {missing}: not found"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"webhook_type": ')
    assert problems(str(broken)) == [f"webhook_config: {broken}: is not valid JSON: Expecting value at line 1 "
                                     f"column 18"]
    number = tmp_path / "number.json"
    number.write_text("3")
    assert problems(str(number)) == [f"webhook_config: {number} must hold an object or a list of objects, got int"]
    assert problems("[1, ") == ["webhook_config: a JSON string that is not valid JSON: Expecting value at line 1 "
                                "column 5"]
    assert problems(3) == ["webhook_config: must be an object, a list of objects, a JSON string or the path of a "
                           "JSON file, got int"]


# --------------------------------------------------------------------------- messages


def both_targets(receiver, **raw_extra) -> list[WebhookTarget]:
    return load_webhook_config([
        {"webhook_type": "raw", "callback_url": receiver.url("/raw/events"), "auth_token": API_KEY, **raw_extra},
        {"webhook_type": "discord", "webhook_url": receiver.url(discord_path())},
    ])


def test_each_event_arrives_in_simpletuners_shape(receiver, tmp_path):
    logs: list[str] = []
    hooks = Webhooks(both_targets(receiver), project_name="proj run", job_id="job-7", log=logs.append)
    before = datetime.now().astimezone()
    hooks.send("start", "Training started\n2 steps to go", step=0)
    hooks.send("checkpoint", "Checkpoint saved", step=100, path=tmp_path / "checkpoint-100")
    hooks.send("validation", "Validation at step 100", step=100)
    hooks.send("finish", "Training run complete.", step=200, path=tmp_path / "out")
    hooks.send("error", "Failed to run training: boom", step=150)
    hooks.close()
    assert logs == []

    discord = receiver.at("/discord/")
    assert [form_content(r) for r in discord] == [
        "`(proj run)` Training started\n2 steps to go", "`(proj run)` Checkpoint saved",
        "`(proj run)` Validation at step 100", "`(proj run)` Training run complete.",
        "`(proj run)` Failed to run training: boom"]
    assert all("x-api-key" not in r["headers"] for r in discord)  # the raw target's token goes to it alone

    raw = receiver.at("/raw/")
    assert all(r["headers"]["x-api-key"] == API_KEY for r in raw)
    events = [raw_json(r) for r in raw]
    for e in events:
        assert e["job_id"] == "job-7"
        assert before <= datetime.fromisoformat(e["timestamp"]) <= datetime.now().astimezone()
        assert "images" not in e and "videos" not in e
    start, checkpoint, validation, finish, error = events
    assert {k: v for k, v in start.items() if k != "timestamp"} == {
        "type": "training.status", "severity": "info", "job_id": "job-7", "title": "Running",
        "message": "Training started\n2 steps to go", "data": {"status": "running", "global_step": 0}}
    assert checkpoint["type"] == "training.checkpoint" and checkpoint["severity"] == "info"
    assert checkpoint["checkpoint"] == {"path": str(tmp_path / "checkpoint-100"), "label": "Checkpoint saved",
                                        "is_final": False}
    assert checkpoint["title"] == checkpoint["message"] == "Checkpoint saved"
    assert checkpoint["data"] == {"global_step": 100}
    assert validation["type"] == "training.validation" and validation["message"] == "Validation at step 100"
    assert validation["data"] == {"global_step": 100}
    assert finish["type"] == "lifecycle.stage" and finish["message"] == "Training run complete."
    assert finish["stage"] == {"key": "training_complete", "label": "Training Complete", "status": "completed",
                               "progress": {"label": "Training Complete", "percent": 100, "current": 200}}
    assert finish["data"] == {"global_step": 200, "path": str(tmp_path / "out")}
    assert error["type"] == "notification" and error["severity"] == "error" and error["title"] == "Fatal Error"
    assert error["message"] == "Failed to run training: boom"
    assert error["data"] == {"status": "error", "global_step": 150}


def test_message_prefix_and_discord_length_limit(receiver):
    targets = load_webhook_config({"webhook_type": "discord", "webhook_url": receiver.url(discord_path()),
                                   "message_prefix": "pfx"})
    with Webhooks(targets, project_name="ignored") as hooks:
        hooks.send("start", "x" * 5000)
    (request,) = receiver.at("/discord/")
    content = form_content(request)
    assert content.startswith("`(pfx)` xxx") and len(content) == 2000 and content.endswith("…")


def test_validation_carries_the_images(receiver, tmp_path):
    png = write_png(tmp_path / "sample.png", color=(0, 255, 0), size=(12, 10))
    gif = write_gif(tmp_path / "sample.gif")
    with Webhooks(both_targets(receiver), project_name="p") as hooks:
        hooks.send("validation", "Validation image for `cat`", step=5, images=[png, str(gif)])

    (discord,) = receiver.at("/discord/")
    content, file0, file1 = multipart_parts(discord)
    assert part_name(content) == "content" and content.get_content() == "`(p)` Validation image for `cat`"
    assert (part_name(file0), file0.get_filename(), file0.get_content_type()) == ("file0", "image0.png", "image/png")
    assert file0.get_payload(decode=True) == png.read_bytes()
    assert (part_name(file1), file1.get_filename(), file1.get_content_type()) == ("file1", "image1.gif", "image/gif")
    assert file1.get_payload(decode=True) == gif.read_bytes()

    (raw,) = receiver.at("/raw/")
    event = raw_json(raw)
    assert event["type"] == "training.validation" and event["data"] == {"global_step": 5}
    (image,) = event["images"]  # SimpleTuner's raw form: plain base64 of a PNG
    decoded = Image.open(io.BytesIO(base64.b64decode(image)))
    assert decoded.format == "PNG" and decoded.size == (12, 10) and decoded.getpixel((0, 0)) == (0, 255, 0)
    (video,) = event["videos"]  # an animation as a data URI, as SimpleTuner's previews send one
    assert video["mime_type"] == "image/gif" and video["src"].startswith("data:image/gif;base64,")
    assert base64.b64decode(video["src"].split(",", 1)[1]) == gif.read_bytes()


def test_discord_takes_at_most_ten_attachments_a_message(receiver, tmp_path):
    pngs = [write_png(tmp_path / f"{i}.png", color=(i * 20, 0, 0)) for i in range(12)]
    targets = load_webhook_config({"webhook_type": "discord", "webhook_url": receiver.url(discord_path())})
    with Webhooks(targets, project_name="p") as hooks:
        hooks.send("validation", "twelve", images=pngs)
    first, second = receiver.at("/discord/")
    parts_a, parts_b = multipart_parts(first), multipart_parts(second)
    assert [part_name(p) for p in parts_a] == ["content"] + [f"file{i}" for i in range(10)]
    assert [part_name(p) for p in parts_b] == ["content", "file0", "file1"]
    assert parts_a[0].get_content() == parts_b[0].get_content() == "`(p)` twelve"
    assert parts_b[2].get_payload(decode=True) == pngs[11].read_bytes()


def test_an_unusable_image_is_left_out_with_one_warning(receiver, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    png = write_png(tmp_path / "ok.png")
    logs: list[str] = []
    with Webhooks(both_targets(receiver), log=logs.append) as hooks:
        hooks.send("validation", "v", images=[tmp_path / "missing.png", not_image, png])
    assert len(logs) == 2
    assert str(tmp_path / "missing.png") in logs[0] and "cannot be read" in logs[0]
    assert str(not_image) in logs[1] and "not a PNG or GIF" in logs[1]
    (raw,) = receiver.at("/raw/")
    assert [base64.b64decode(i) for i in raw_json(raw)["images"]] == [png.read_bytes()]
    (discord,) = receiver.at("/discord/")
    assert [part_name(p) for p in multipart_parts(discord)] == ["content", "file0"]


def test_log_level_filters_like_simpletuner(receiver):
    targets = load_webhook_config([
        {"webhook_type": "raw", "callback_url": receiver.url("/raw/error-level"), "log_level": "error"},
        {"webhook_type": "raw", "callback_url": receiver.url("/raw/critical-level"), "log_level": "critical"},
        {"webhook_type": "raw", "callback_url": receiver.url("/raw/debug-level"), "log_level": "debug"},
        {"webhook_type": "discord", "webhook_url": receiver.url(discord_path())},  # info by default
    ])
    with Webhooks(targets) as hooks:
        hooks.send("checkpoint", "info message")
        hooks.send("checkpoint", "debug message", level="debug")
        hooks.send("checkpoint", "warning message", level="warning")
        hooks.send("checkpoint", "error message", level="error")
        hooks.send("error", "fatal")  # filtered as critical, reported with severity "error"
    assert [raw_json(r)["message"] for r in receiver.at("/raw/error-level")] == ["error message", "fatal"]
    assert [raw_json(r)["message"] for r in receiver.at("/raw/critical-level")] == ["fatal"]
    debug = [raw_json(r) for r in receiver.at("/raw/debug-level")]
    assert [(e["message"], e["severity"]) for e in debug] == [
        ("info message", "info"), ("debug message", "debug"), ("warning message", "warning"),
        ("error message", "error"), ("fatal", "error")]
    assert [form_content(r).split(" ", 1)[1] for r in receiver.at("/discord/")] == [
        "info message", "warning message", "error message", "fatal"]


# --------------------------------------------------------------------------- failures


def assert_no_secret(line: str, *urls: str) -> None:
    for secret in (DISCORD_TOKEN, API_KEY, "/api/webhooks", "/hook/", *urls):
        assert secret not in line


def test_a_500_and_a_closed_port_each_print_one_warning_and_training_goes_on(receiver, closed_port):
    fail_url = receiver.url(discord_path("fail"))
    closed_url = f"http://127.0.0.1:{closed_port}/hook/{DISCORD_TOKEN}"
    targets = load_webhook_config([
        {"webhook_type": "discord", "webhook_url": fail_url},
        {"webhook_type": "raw", "callback_url": closed_url, "auth_token": API_KEY},
        {"webhook_type": "raw", "callback_url": receiver.url("/raw/healthy")},
    ])
    logs: list[str] = []
    hooks = Webhooks(targets, log=logs.append)
    hooks.send("checkpoint", "saved", step=3)  # returns: nothing raised
    hooks.close()
    assert len(logs) == 2 and all("\n" not in line for line in logs)
    http_500 = [line for line in logs if "HTTP 500" in line]
    refused = [line for line in logs if f"127.0.0.1:{closed_port}" in line]
    assert len(http_500) == 1 and len(refused) == 1
    assert f"discord webhook to 127.0.0.1:{receiver.port} failed" in http_500[0]
    assert f"raw webhook to 127.0.0.1:{closed_port} failed" in refused[0] and "refused" in refused[0].lower()
    for line in logs:
        assert_no_secret(line, fail_url, closed_url)
    assert len(receiver.at("/fail/")) == 1  # the 500 was asked once, not retried
    assert [raw_json(r)["message"] for r in receiver.at("/raw/healthy")] == ["saved"]  # the others still got it

    hooks.send("finish", "done")  # the sender keeps working after failures
    hooks.close()
    assert len(logs) == 4
    assert [raw_json(r)["message"] for r in receiver.at("/raw/healthy")] == ["saved", "done"]


def test_a_slow_receiver_times_out_without_blocking_send(receiver):
    slow_url = receiver.url(f"/slow/{DISCORD_TOKEN}")
    targets = load_webhook_config({"webhook_type": "raw", "callback_url": slow_url})
    logs: list[str] = []
    hooks = Webhooks(targets, log=logs.append, timeout=0.3)
    started = time.monotonic()
    hooks.send("start", "go")
    assert time.monotonic() - started < 0.25  # posted from the background thread
    hooks.close()
    assert time.monotonic() - started < 1.4  # bounded by the time-out, not the receiver's 1.5 s
    (line,) = logs
    assert f"raw webhook to 127.0.0.1:{receiver.port} failed" in line and "timed out" in line
    assert_no_secret(line, slow_url)


def test_a_redirect_is_not_followed(receiver):
    targets = load_webhook_config({"webhook_type": "raw", "callback_url": receiver.url(f"/redirect/{DISCORD_TOKEN}"),
                                   "auth_token": API_KEY})
    logs: list[str] = []
    with Webhooks(targets, log=logs.append) as hooks:
        hooks.send("start", "go")
    (line,) = logs
    assert "HTTP 302" in line and f"127.0.0.1:{receiver.port}" in line
    assert_no_secret(line)
    assert receiver.at("/raw/elsewhere") == []  # the token never went on to another URL


def test_synchronous_mode_posts_before_send_returns(receiver):
    hooks = Webhooks(both_targets(receiver), background=False)
    hooks.send("start", "now")
    assert [raw_json(r)["message"] for r in receiver.at("/raw/")] == ["now"]
    assert [form_content(r) for r in receiver.at("/discord/")] == ["`(simpletuner-dmd)` now"]


def test_no_targets_sends_nothing_and_bad_calls_are_bugs(receiver):
    empty = Webhooks(load_webhook_config(None))
    assert not empty
    empty.send("start", "nobody listens")
    empty.close()
    hooks = Webhooks(both_targets(receiver))
    assert hooks
    with pytest.raises(ValueError, match="unknown webhook event 'begin'"):
        hooks.send("begin", "x")
    with pytest.raises(ValueError, match="unknown webhook level 'loud'"):
        hooks.send("start", "x", level="loud")
    hooks.close()
    assert receiver.requests == []


# --------------------------------------------------------------------------- through the reference host


def test_a_training_run_sends_start_checkpoint_validation_finish_and_a_failing_one_sends_its_error(receiver, job,
                                                                                                  tmp_path):
    from simpletuner_dmd.hosts.reference.trainer import train

    hooks = tmp_path / "webhook.json"
    hooks.write_text(json.dumps([{"webhook_type": "raw", "callback_url": receiver.url("/raw/run")}]))
    train(job(max_train_steps=2, checkpoint_step_interval=1, validation_step_interval=0, webhook_config=str(hooks),
              disable_benchmark=True))
    events = [json.loads(r["body"]) for r in receiver.at("/raw/run")]
    assert [e["type"] for e in events] == ["training.status", "training.checkpoint", "training.checkpoint",
                                           "training.validation", "lifecycle.stage"]
    assert [e["data"]["global_step"] for e in events[1:3]] == [1, 2]
    assert events[1]["checkpoint"]["path"].endswith("checkpoint-1")
    gif = base64.b64decode(events[3]["videos"][0]["src"].split(",", 1)[1])
    assert gif[:6] in (b"GIF87a", b"GIF89a")  # the validation sample itself
    assert events[4]["stage"]["status"] == "completed"

    # a run that fails in its loop: the error goes out, and the error itself still reaches the caller
    from simpletuner_dmd import hookimpl

    class Boom:
        @hookimpl(tryfirst=True)
        def distill_loss(self, batch, step, host_loss):
            raise RuntimeError("a bug in a plugin")

    with pytest.raises(RuntimeError, match="a bug in a plugin"):
        train(job(max_train_steps=1, webhook_config=str(hooks), disable_benchmark=True, output_dir=str(tmp_path / "b")),
              plugins=(Boom(),))
    last = json.loads(receiver.at("/raw/run")[-1]["body"])
    assert last["type"] == "notification" and last["severity"] == "error"
    assert last["message"] == "training stopped: RuntimeError: a bug in a plugin"
