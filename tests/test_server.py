"""`molecule-gpt serve` / molecule_gpt.server: the official openai client against a real uvicorn
server on a loopback port; raw HTTP for what a client library would not send (bad JSON, huge
bodies); the command line end to end in a subprocess."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import molecule_gpt as mg  # noqa: E402
from molecule_gpt import cli, server  # noqa: E402
from molecule_gpt.server import Limits, chat_prompt, create_app  # noqa: E402

from live_server import LiveServer, pace_streams  # noqa: E402

SMALL = {"warmup_steps": 40, "eval_interval": 20}


def small_organism(**config) -> mg.Organism:
    org = mg.Organism(mg.Config(**{**SMALL, **config}), mg.seed_corpus_lines(), memory=":memory:")
    org.warmup()
    return org


def client(srv, key="unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def assert_error_object(resp, status, param=None, code=None):
    """An OpenAI error object with the status; never a traceback."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def frozen_org():
    org = small_organism()
    yield org
    org.close()


@pytest.fixture(scope="module")
def frozen(frozen_org):
    """A server that does not learn: the weights and the field stay as they are between requests."""
    with LiveServer(create_app(organisms={"pet": frozen_org}, learn=False,
                               limits=Limits(max_body_bytes=20_000, max_prompt_chars=4_000))) as srv:
        yield srv


# ---------------------------------------------------------------------------------------------
# the OpenAI surface


def test_models_list_and_retrieve(frozen):
    c = client(frozen)
    models = c.models.list()
    assert [m.id for m in models.data] == ["pet"]
    assert models.data[0].owned_by == "molecule-gpt"
    assert c.models.retrieve("pet").id == "pet"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("cat")


def test_chat_completion_plain(frozen, frozen_org):
    c = client(frozen)
    r = c.chat.completions.create(model="pet", messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "what is a river?"}],
                                  seed=7, max_tokens=24)
    assert r.object == "chat.completion" and r.model == "pet" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert 1 <= u.completion_tokens <= 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    # the prompt is the system message and the user's, as plain text, counted in the organism's tokens
    prompt = "Be brief. what is a river?"
    ids = frozen_org.tokenizer.encode(prompt)
    assert u.prompt_tokens == len(ids) - 1  # without the EOS a prompt does not end with
    # the same request again: the same text (seeded, weights unchanged)
    again = c.chat.completions.create(model="pet", messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "what is a river?"}],
                                      seed=7, max_tokens=24)
    assert again.choices[0].message.content == choice.message.content


def test_temperature_zero_is_greedy(frozen):
    c = client(frozen)
    texts = {c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "the sun"}],
                                       temperature=0, seed=s, max_tokens=20).choices[0].message.content
             for s in (1, 2, 3)}
    assert len(texts) == 1  # no randomness left: the seed does not matter
    warm = {c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "the sun"}],
                                      temperature=1.5, seed=s, max_tokens=20).choices[0].message.content
            for s in (1, 2, 3)}
    assert len(warm) > 1


def test_streamed_equals_plain_for_the_same_seed(frozen, monkeypatch):
    pace_streams(monkeypatch)  # so that the pieces do not queue up into one event (see there)
    c = client(frozen)
    messages = [{"role": "user", "content": "tell me about the sea"}]
    plain = c.chat.completions.create(model="pet", messages=messages, seed=11, max_tokens=40, temperature=0.9)
    chunks = list(c.chat.completions.create(model="pet", messages=messages, seed=11, max_tokens=40,
                                            temperature=0.9, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 1  # it streamed, piece by piece
    assert "".join(pieces) == plain.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_concurrent_requests_are_decoded_together(frozen, frozen_org, monkeypatch):
    """Streams of several clients at once share the organism's decode steps (one batched
    forward for all of them), and each gets exactly the reply it gets alone."""
    c = client(frozen)
    asks = [([{"role": "user", "content": f"tell me about the {w}"}], seed)
            for seed, w in enumerate(("sea", "sky", "cat", "river", "moon", "forest"))]
    plain = [c.chat.completions.create(model="pet", messages=m, seed=seed, max_tokens=24, temperature=0.9)
             .choices[0].message.content for m, seed in asks]
    pace_streams(monkeypatch, 0.005)  # each reply takes long enough for the others to join it
    before = httpx.get(frozen.url + "/v1/organisms/pet/status").json()["decoding"]
    barrier = threading.Barrier(len(asks))
    got = [None] * len(asks)

    def ask(i):
        m, seed = asks[i]
        barrier.wait()
        chunks = c.chat.completions.create(model="pet", messages=m, seed=seed, max_tokens=24, temperature=0.9,
                                           stream=True)
        got[i] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == plain
    after = httpx.get(frozen.url + "/v1/organisms/pet/status").json()["decoding"]
    assert after["tokens"] - before["tokens"] > after["steps"] - before["steps"] > 0  # steps advanced several
    assert after["largest"] > 1
    line = next(x for x in cli.status_text(frozen_org).splitlines() if x.startswith("decoding"))
    assert f"largest {after['largest']}" in line and "batched steps" in line


def test_stream_is_server_sent_events_ending_with_done(frozen):
    with httpx.stream("POST", frozen.url + "/v1/chat/completions", timeout=60,
                      json={"model": "pet", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "max_tokens": 10, "seed": 1}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        chunk = json.loads(e[6:])
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "pet"


def test_n_choices_use_consecutive_seeds(frozen):
    c = client(frozen)
    messages = [{"role": "user", "content": "a story"}]
    r = c.chat.completions.create(model="pet", messages=messages, n=3, seed=20, max_tokens=20)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    for i, choice in enumerate(r.choices):
        single = c.chat.completions.create(model="pet", messages=messages, seed=20 + i, max_tokens=20)
        assert choice.message.content == single.choices[0].message.content
    assert r.usage.completion_tokens >= 3
    # streamed, the choices arrive with their index
    chunks = list(c.chat.completions.create(model="pet", messages=messages, n=2, seed=20, max_tokens=20, stream=True))
    by_index = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index.setdefault(choice.index, []).append(choice.delta.content or "")
    assert ["".join(by_index[i]) for i in (0, 1)] == [r.choices[0].message.content, r.choices[1].message.content]


def test_completions_plain_streamed_and_echo(frozen, frozen_org):
    c = client(frozen)
    r = c.completions.create(model="pet", prompt="the river", seed=5, max_tokens=16, n=2)
    assert r.object == "text_completion" and [ch.index for ch in r.choices] == [0, 1]
    assert all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    assert r.usage.prompt_tokens == len(frozen_org.tokenizer.encode("the river")) - 1  # one prompt, counted once
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="pet", prompt="the river", seed=5, max_tokens=16, stream=True)
                       if ch.choices)
    assert streamed == r.choices[0].text
    echoed = c.completions.create(model="pet", prompt="the river", seed=5, max_tokens=16, echo=True)
    assert echoed.choices[0].text == "the river" + r.choices[0].text
    batch = c.completions.create(model="pet", prompt=["the river", "a cat"], seed=5, max_tokens=16)
    assert [ch.index for ch in batch.choices] == [0, 1] and batch.choices[0].text == r.choices[0].text


def test_max_tokens_and_stop(frozen):
    c = client(frozen)
    r = c.completions.create(model="pet", prompt="the", seed=3, max_tokens=1)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"
    long = c.completions.create(model="pet", prompt="the", seed=3, max_tokens=60, temperature=0)
    text = long.choices[0].text
    cut = next((ch for ch in text[3:] if ch.isalpha()), None)
    assert cut is not None, text
    stopped = c.completions.create(model="pet", prompt="the", seed=3, max_tokens=60, temperature=0, stop=[cut])
    assert stopped.choices[0].text == text[:text.index(cut)] and stopped.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# errors: OpenAI error objects, right status codes, no traceback


def test_bad_requests_are_400_error_objects(frozen):
    c = client(frozen)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "x"}], temperature=2.5)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    url = frozen.url + "/v1/chat/completions"
    cases = [
        ({"model": "pet"}, "messages"),
        ({"model": "pet", "messages": []}, "messages"),
        ({"model": "pet", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "pet", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}, "max_tokens"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "seed": "one"}, "seed"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, None),
        ({"model": "pet", "messages": [{"role": "user", "content": "x"}], "colour": "red"}, "colour"),
        ({"model": "pet", "messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ]
    for body, param in cases:
        raw = json.dumps(body, allow_nan=True)
        resp = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        err = assert_error_object(resp, 400, param)
        assert err["type"] == "invalid_request_error"
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        assert_error_object(httpx.post(url, content=raw, timeout=30), 400)
    assert_error_object(httpx.post(frozen.url + "/v1/completions", json={"model": "pet", "prompt": 3}), 400, "prompt")


def test_unknown_model_route_and_method_are_404_405(frozen):
    c = client(frozen)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="cat", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    assert_error_object(httpx.get(frozen.url + "/v1/nothing"), 404)
    assert_error_object(httpx.get(frozen.url + "/v1/organisms/cat/status"), 404)
    assert_error_object(httpx.get(frozen.url + "/v1/chat/completions"), 405)


def test_too_large_body_is_413(frozen):
    url = frozen.url + "/v1/chat/completions"
    big = {"model": "pet", "messages": [{"role": "user", "content": "x" * 30_000}]}
    assert_error_object(httpx.post(url, json=big, timeout=30), 413, code="request_too_large")

    # chunked, without a Content-Length: the server counts what arrives
    def chunks():
        yield json.dumps(big).encode()
    assert_error_object(httpx.post(url, content=chunks(), timeout=30), 413)


def test_api_key(frozen_org):
    with LiveServer(create_app(organisms={"pet": frozen_org}, learn=False, api_key="s3cret")) as srv:
        with pytest.raises(openai.AuthenticationError) as e:
            client(srv, key="wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").chat.completions.create(model="pet", messages=[{"role": "user", "content": "x"}])
        assert_error_object(httpx.get(srv.url + "/v1/models"), 401)  # no key at all
        assert_error_object(httpx.get(srv.url + "/v1/organisms/pet/status"), 401)
        good = client(srv, key="s3cret")
        assert [m.id for m in good.models.list().data] == ["pet"]
        assert good.chat.completions.create(model="pet", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=5).choices[0].message.content is not None
        assert httpx.get(srv.url + "/").status_code == 200  # the page itself asks for the key


# ---------------------------------------------------------------------------------------------
# learning from what it serves


def test_a_resent_history_is_learned_once():
    org = small_organism()
    try:
        with LiveServer(create_app(organisms={"pet": org}, learn=True)) as srv:
            c = client(srv)
            history = [{"role": "system", "content": "You are a pet."},
                       {"role": "user", "content": "my cat is called Pixel"}]
            r1 = c.chat.completions.create(model="pet", messages=history, seed=1, max_tokens=20)
            history += [{"role": "assistant", "content": r1.choices[0].message.content},
                        {"role": "user", "content": "what is my cat called?"}]
            r2 = c.chat.completions.create(model="pet", messages=history, seed=2, max_tokens=20, stream=True)
            reply2 = "".join(ch.choices[0].delta.content or "" for ch in r2 if ch.choices)
            history += [{"role": "assistant", "content": reply2}, {"role": "user", "content": "thank you"}]
            c.chat.completions.create(model="pet", messages=history, n=2, seed=3, max_tokens=20)  # n=2: no reply learned
            expected = [("H", "my cat is called Pixel"), ("A", r1.choices[0].message.content.strip()),
                        ("H", "what is my cat called?"), ("A", reply2.strip()), ("H", "thank you")]
            expected = [(role, text) for role, text in expected if text]
            got = wait_for(lambda: (m := [(x.role, x.text) for x in org.memory.messages()]) and
                           len(m) >= len(expected) and m, what="the turns to be learned")
            time.sleep(0.3)  # nothing more arrives
            assert [(x.role, x.text) for x in org.memory.messages()] == expected == got
            assert not any("You are a pet" in line for line in org.reservoir.lines)  # the system message is context
            assert any(line.endswith("my cat is called Pixel") for line in org.reservoir.lines)
            status = httpx.get(srv.url + "/v1/organisms/pet/status").json()
            assert status["memory"]["messages"] == len(expected) and status["learning"] is True
    finally:
        org.close()


def test_no_learn_observes_nothing(frozen, frozen_org):
    before = (len(frozen_org.memory.messages()), list(frozen_org.reservoir.lines))
    client(frozen).chat.completions.create(model="pet", messages=[{"role": "user", "content": "remember me"}])
    time.sleep(0.2)
    assert (len(frozen_org.memory.messages()), list(frozen_org.reservoir.lines)) == before
    assert frozen_org.stats()["background"]["running"] is False


def test_prompts_hold_only_their_own_conversation(frozen, frozen_org, monkeypatch):
    prompts = []
    submit = frozen_org.submit

    def spy(prompt, **kw):
        prompts.append(prompt)
        return submit(prompt, **kw)

    monkeypatch.setattr(frozen_org, "submit", spy)
    c = client(frozen)
    c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "my password is zebra42"}])
    c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "what is the password?"}])
    assert prompts == ["my password is zebra42", "what is the password?"]


def test_chat_prompt_recalls_relevant_turns_of_the_same_conversation():
    turns = [("system", "Be kind."), ("user", "my dog is Rex"), ("assistant", "nice"), ("user", "the weather"),
             ("assistant", "sunny"), ("user", "tea"), ("assistant", "yes"), ("user", "what is my dog called?")]
    p = chat_prompt(turns, recent=3, relevant=1)
    assert p == "Be kind. my dog is Rex tea yes what is my dog called?"
    assert chat_prompt(turns, recent=3, relevant=0) == "Be kind. tea yes what is my dog called?"


def test_status_route_is_the_terminal_status(frozen, frozen_org):
    doc = httpx.get(frozen.url + "/v1/organisms/pet/status").json()
    assert doc["name"] == "pet" and doc["state"] == "ready" and doc["learning"] is False
    assert doc["steps"] == frozen_org.trainer.steps and doc["vocab_size"] == frozen_org.model.vocab_size
    assert doc["history"]["val_loss"], "the warmup's held-out evaluations"
    # the same document renders /status in the terminal
    text = cli.status_text(frozen_org)
    assert f"steps          {doc['steps']} " in text and f"vocabulary     {doc['vocab_size']} tokens" in text


def test_status_shows_a_burst():
    org = small_organism()
    try:
        with LiveServer(create_app(organisms={"pet": org}, learn=True)) as srv:
            before = httpx.get(srv.url + "/v1/organisms/pet/status").json()
            org.observe("the organism hears something new about rivers and cats", speaker="H")
            report = org.train_burst()
            after = httpx.get(srv.url + "/v1/organisms/pet/status").json()
        assert after["bursts"]["total"] == before["bursts"]["total"] + 1
        assert after["history"]["bursts"][-1]["accepted"] == report.accepted
        assert len(after["history"]["val_loss"]) == len(before["history"]["val_loss"]) + 1
    finally:
        org.close()


# ---------------------------------------------------------------------------------------------
# homes: loading (503), birth and warmup, --homes


def test_loading_home_answers_503_then_serves(tmp_path, monkeypatch, capfd):
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    gate = threading.Event()
    real = cli.run_warmup

    def held_warmup(org, home, *a, **kw):
        gate.wait(60)  # the test looks at the server while this home is still loading
        return real(org, home, *a, **kw)

    monkeypatch.setattr(cli, "run_warmup", held_warmup)
    home = tmp_path / "pet"
    with LiveServer(create_app(home=home, config=config)) as srv:
        c = client(srv)
        assert [m.id for m in c.models.list().data] == ["pet"]
        resp = httpx.post(srv.url + "/v1/chat/completions", json={"model": "pet", "messages": [
            {"role": "user", "content": "hello"}]})
        assert_error_object(resp, 503, code="model_loading")
        assert resp.headers["retry-after"]
        assert httpx.get(srv.url + "/v1/organisms/pet/status").status_code == 503
        gate.set()
        wait_for(lambda: httpx.get(srv.url + "/v1/organisms/pet/status").status_code == 200, 120, "the warmup")
        r = c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "hello"}], max_tokens=10)
        assert r.choices[0].message.content is not None
        with pytest.raises(Exception):  # the home is locked as chat locks it
            with cli.Home(home, cli.load_options(None)).locked():
                pass
    err = capfd.readouterr().err
    assert re.search(r"warmup \[#+\] 40/40", err), err  # chat's progress line, in the log
    assert (home / "organism.ckpt").exists()  # saved at shutdown
    saved = mg.Organism.load(home / "organism.ckpt")
    assert saved.trainer.warmed_up
    saved.close()


def test_homes_serves_each_subfolder(tmp_path):
    root = tmp_path / "homes"
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True)
        (root / name / "x").touch()
    (root / "not a name").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    app = create_app(homes=root, config=config)
    assert sorted(app.state.served) == ["alpha", "beta"]
    with LiveServer(app) as srv:
        wait_for(lambda: all(httpx.get(f"{srv.url}/v1/organisms/{n}/status").status_code == 200
                             for n in ("alpha", "beta")), 120, "both homes")
        c = client(srv)
        assert sorted(m.id for m in c.models.list().data) == ["alpha", "beta"]
        for name in ("alpha", "beta"):
            assert c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=5).model == name
        assert_error_object(httpx.get(srv.url + "/v1/organisms/..%2Foutside/status"), 404)
    assert not any(outside.iterdir())  # nothing was born outside DIR
    with pytest.raises(ValueError, match="holds no organism folders"):
        create_app(homes=outside)


def test_create_app_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        create_app()
    with pytest.raises(ValueError, match="model id"):
        create_app(organisms={"../x": None})
    with pytest.raises(TypeError):
        create_app(organisms={"x": object()})
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("192.168.1.2")


# ---------------------------------------------------------------------------------------------
# the command line


def run_cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "molecule_gpt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_serve_refuses_a_public_host_without_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MOLECULE_GPT_API_KEY"}
    proc = run_cli("serve", "--home", tmp_path / "h", "--host", "0.0.0.0", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--api-key" in proc.stderr and not (tmp_path / "h").exists()
    proc = run_cli("serve", "--home", tmp_path / "h", "--homes", tmp_path, env=env)
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_serve_command_end_to_end(tmp_path):
    """Born, warmed up (progress line), served, chatted with, learned, saved on Ctrl-C."""
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    home = tmp_path / "pet"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "molecule_gpt", "serve", "--home", str(home), "--config",
                             str(config), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                return httpx.get(url + "/v1/organisms/pet/status", timeout=5).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # ended early: the asserts below say why
        wait_for(ready, 120, "the server")
        assert proc.poll() is None
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        reply = c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "good morning"}],
                                          max_tokens=12).choices[0].message.content
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<title>molecule-gpt</title>" in page.text
        assert httpx.get(url + "/static/app.js").status_code == 200
        wait_for(lambda: httpx.get(url + "/v1/organisms/pet/status").json()["memory"]["messages"] >= 1 + bool(
            reply.strip()), 30, "the turn to be learned")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Serving pet on http://127.0.0.1" in out and "A new organism is born" in out
    assert re.search(r"warmup \[#+\] 40/40", err), err
    assert "POST /v1/chat/completions 200 model=pet" in err  # one log line per request
    assert "Traceback" not in err
    memory = mg.Memory(home / "memory.sqlite", read_only=True)
    try:
        texts = [m.text for m in memory.messages()]
    finally:
        memory.close()
    assert texts[0] == "good morning"
    org = mg.Organism.load(home / "organism.ckpt")
    try:
        assert any(line.endswith("good morning") for line in org.reservoir.lines + org.heard_val_lines)
    finally:
        org.close()


def test_mounted_in_another_app(frozen_org):
    """create_app's application under a prefix of the user's own app (its lifespan run by theirs)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    inner = create_app(organisms={"pet": frozen_org}, learn=False)
    outer = Starlette(routes=[Mount("/pet", app=inner)], lifespan=lambda app: inner.router.lifespan_context(inner))
    with LiveServer(outer) as srv:
        page = httpx.get(srv.url + "/pet/", timeout=30)
        assert page.status_code == 200 and 'href="static/style.css"' in page.text  # relative: under the prefix
        assert httpx.get(srv.url + "/pet/static/app.js").status_code == 200
        c = openai.OpenAI(base_url=srv.url + "/pet/v1", api_key="x", max_retries=0)
        assert c.chat.completions.create(model="pet", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4).model == "pet"


def test_the_page_loads_nothing_from_elsewhere():
    """Everything the page needs ships in the package: no absolute URL in what it loads."""
    web = pathlib.Path(server.__file__).parent / "web"
    assert sorted(p.name for p in web.iterdir()) == ["app.js", "index.html", "style.css"]
    for path in web.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import|"""
                             r"""fetch\(\s*["'](?:https?:)?//""", text), path.name
    page = (web / "index.html").read_text(encoding="utf-8")
    assert 'href="static/style.css"' in page and 'src="static/app.js"' in page


def record_submissions(monkeypatch, org) -> list:
    """The generations the server submits to `org` from now on, in order."""
    jobs = []
    submit = org.submit

    def keep(*args, **kw):
        jobs.append(submit(*args, **kw))
        return jobs[-1]

    monkeypatch.setattr(org, "submit", keep)
    return jobs


def test_a_client_that_leaves_mid_stream(monkeypatch):
    """Its new turn is learned, the reply it did not wait for is not; the server goes on."""
    pace_streams(monkeypatch, 0.02)  # the reply takes over a second: the client leaves in the middle
    org = small_organism(min_gen_tokens=60)
    jobs = record_submissions(monkeypatch, org)
    try:
        with LiveServer(create_app(organisms={"pet": org}, learn=True)) as srv:
            body = {"model": "pet", "messages": [{"role": "user", "content": "a long story please"}],
                    "stream": True, "max_tokens": 60}
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
                events = resp.iter_lines()
                first = [next(events) for _ in range(4)]  # the role chunk and some pieces, then away
            assert all(e.startswith("data: ") or e == "" for e in first)
            left = jobs[0].result(timeout=30)  # the generation stopped when the client went away
            assert left.stop_reason == "cancelled" and len(left.ids) < 60
            wait_for(lambda: [(m.role, m.text) for m in org.memory.messages()] == [("H", "a long story please")],
                     30, "the user's turn")
            time.sleep(1.5)  # longer than the whole reply would have taken: it is not learned later
            assert [(m.role, m.text) for m in org.memory.messages()] == [("H", "a long story please")]
            r = client(srv).chat.completions.create(model="pet", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=5)
            assert r.choices[0].message.content is not None
    finally:
        org.close()


def test_a_client_that_leaves_a_stream_of_several_choices_ends_them_all(monkeypatch):
    """n = 2, streamed: the choices decode at once and arrive interleaved by index; when the
    client goes away, both generations end at their next step."""
    pace_streams(monkeypatch, 0.02)
    org = small_organism(min_gen_tokens=60)
    jobs = record_submissions(monkeypatch, org)
    try:
        with LiveServer(create_app(organisms={"pet": org}, learn=False)) as srv:
            body = {"model": "pet", "messages": [{"role": "user", "content": "two long stories"}],
                    "stream": True, "max_tokens": 60, "n": 2, "seed": 4}
            indices = []
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[6:])["choices"]
                        if choices and choices[0]["delta"].get("content"):
                            indices.append(choices[0]["index"])
                    if len(set(indices)) == 2 and len(indices) >= 6:
                        break  # both choices have streamed: away
            assert len(jobs) == 2
            results = [j.result(timeout=30) for j in jobs]
            assert [r.stop_reason for r in results] == ["cancelled", "cancelled"]
            assert all(len(r.ids) < 60 for r in results)
    finally:
        org.close()


def test_an_organism_whose_trainer_runs_already(frozen_org):
    """create_app(organisms=...) with the caller's background trainer running: left to them."""
    org = small_organism()
    try:
        org.start_background()
        with LiveServer(create_app(organisms={"pet": org}, learn=True)) as srv:
            assert client(srv).chat.completions.create(
                model="pet", messages=[{"role": "user", "content": "hi"}], max_tokens=4).model == "pet"
        assert org.stats()["background"]["running"]  # the server did not stop what it did not start
    finally:
        org.close()


def test_a_home_that_cannot_load_says_why(tmp_path):
    home = tmp_path / "pet"
    home.mkdir()
    (home / "organism.ckpt").write_bytes(b"not a checkpoint at all")
    with LiveServer(create_app(home=home)) as srv:
        doc = wait_for(lambda: (d := httpx.get(srv.url + "/v1/organisms/pet/status").json())["state"] != "loading"
                       and d, 60, "the load to end")
        assert doc["state"] == "failed" and "damaged" in doc["error"]
        resp = httpx.post(srv.url + "/v1/chat/completions",
                          json={"model": "pet", "messages": [{"role": "user", "content": "hi"}]})
        err = assert_error_object(resp, 503, code="model_failed")
        assert "damaged" in err["message"]
    assert (home / "organism.ckpt").read_bytes() == b"not a checkpoint at all"  # nothing overwritten


def test_a_sliding_window_of_history_is_learned_once():
    """A client that sends only its system prompt and the newest messages (a window that slides
    as the conversation grows) has each turn learned once, as one that resends everything."""
    org = small_organism()
    try:
        with LiveServer(create_app(organisms={"pet": org}, learn=True)) as srv:
            c = client(srv)
            system = {"role": "system", "content": "You are a pet."}
            history, expected = [], []
            for k, line in enumerate(["my cat is called Pixel", "she likes the garden", "she sleeps a lot",
                                      "she is nine years old", "thank you"]):
                history.append({"role": "user", "content": line})
                r = c.chat.completions.create(model="pet", messages=[system, *history[-3:]], seed=k, max_tokens=12)
                reply = r.choices[0].message.content
                history.append({"role": "assistant", "content": reply})
                expected += [("H", line)] + ([("A", reply.strip())] if reply.strip() else [])
            got = wait_for(lambda: (m := [(x.role, x.text) for x in org.memory.messages()]) and
                           len(m) >= len(expected) and m, what="the turns to be learned")
            time.sleep(0.3)  # nothing more arrives
            assert [(x.role, x.text) for x in org.memory.messages()] == expected == got
    finally:
        org.close()


def test_the_learner_learns_the_rest_when_the_memory_refuses_a_message(monkeypatch, caplog):
    """The server's learner observes a batch of turns in one go; when the memory refuses the
    batch, each turn is tried alone: the refused one is logged and not learned, the others are."""
    from molecule_gpt.errors import MemoryStoreError
    from molecule_gpt.server import learn_turns

    org = small_organism()
    try:
        real = org.memory.add_messages

        def picky(turns, **kw):
            if any("forbidden" in text for _, text in turns):
                raise MemoryStoreError("the disk is full (simulated)")
            return real(turns, **kw)

        monkeypatch.setattr(org.memory, "add_messages", picky)
        turns = [("H", "the lamp is green"), ("A", "a forbidden word"), ("H", "the door is blue")]
        with caplog.at_level("ERROR", logger="molecule_gpt.server"):
            learn_turns(org, turns, "pet")
        assert [(m.role, m.text) for m in org.memory.messages()] == [turns[0], turns[2]]
        assert not any("forbidden" in line for line in org.reservoir.lines)
        assert any(line.endswith("the door is blue") for line in org.reservoir.lines)
        assert "could not learn a message" in caplog.text and "simulated" in caplog.text
    finally:
        org.close()
