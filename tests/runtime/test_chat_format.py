"""Chat formats for models without a chat template: the real Gemma 3 270M GGUF (it carries no
``tokenizer.chat_template``) through the real worker and engine, and through a real daemon.

Precedence (config over manifest over the GGUF's own) is the selector's, tested on the real
headers; the worker only applies what the Selection says."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from agent.catalog.gguf import read_gguf_file
from agent.catalog.manifest import load_manifest, parse_manifest
from agent.catalog.select import choose
from agent.catalog.selection import MemoryEstimate, Selection
from agent.config import MAX_CHAT_TEMPLATE_BYTES, ModelConfig, load_config
from agent.errors import ConfigError, ManifestError, ModelLoadError
from agent.runtime.request import GenerateRequest
from agent.runtime.worker import ChatFormatRefused, registered_formatter
from tests.catalog.conftest import make_device, make_profile
from tests.support.broker import Broker
from tests.support.daemon import BASE, RunningDaemon, wait_final, wait_ready
from tests.support.observer import Observers

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GEMMA_TURNS = ("<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
               "<start_of_turn>model\n")
# The turn markup of Gemma's own chat template, as a Jinja file an operator would write (Jinja
# drops the file's last newline, so the comment keeps the one after "model").
GEMMA_JINJA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}<start_of_turn>model\n{# the prompt ends in a newline #}"
)


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path):
    manifest = load_manifest(str(gemma_dir / "manifest.json"))
    variant = next(v for v in manifest.model().variants if v.quant == "Q4_K_M")
    return gemma_dir / variant.file, variant


def gemma_selection(gemma, **overrides) -> Selection:
    path, variant = gemma
    fields = dict(model_id="gemma-3-270m", quant=variant.quant, file=variant.file,
                  size=variant.size, sha256=variant.sha256, urls=[], quality=variant.quality,
                  n_ctx=512, n_batch=256, n_ubatch=256, n_threads=1,
                  estimate=MemoryEstimate(ram_bytes=400 * 1024 * 1024), model_path=str(path))
    fields.update(overrides)
    return Selection(**fields)


def ask(engine, request_id: str, **fields) -> dict:
    if "prompt" not in fields:
        fields.setdefault("messages", QUESTION)
    return list(engine.generate(GenerateRequest(id=request_id, max_tokens=12, temperature=0.0,
                                                seed=7, **fields)))[-1]


def test_no_template_refuses_messages_until_a_chat_format_is_named(make_engine, gemma, tmp_path):
    assert "tokenizer.chat_template" not in read_gguf_file(gemma[0]).metadata
    plain = make_engine()
    plain.load(gemma_selection(gemma))
    refused = ask(plain, "no-template")["error"]  # the worker's final: it tokenizes, once
    assert refused["code"] == "bad_request" and "chat_format" in refused["message"]
    assert "error" not in ask(plain, "raw", prompt="Paris is the capital of")
    plain.close()

    named = make_engine()
    named.load(gemma_selection(gemma, chat_format="gemma"))
    answer = ask(named, "named")
    assert "error" not in answer and answer["usage"]["completion_tokens"] >= 1, answer
    # The oracle: Gemma's turn markup sent as a raw prompt, with the format's stop string. (The
    # 270M base model is no chat model: what it says is not the point, how it was asked is.)
    raw = ask(named, "markup", prompt=GEMMA_TURNS, stop=["<end_of_turn>\n"])
    assert (answer["text"], answer["usage"]) == (raw["text"], raw["usage"])
    named.close()

    # The same turns as a Jinja file give the same prompt, so the same greedy answer.
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_JINJA)
    from_file = make_engine()
    from_file.load(gemma_selection(gemma, chat_format=str(template)))
    in_file = ask(from_file, "file")
    assert (in_file["text"], in_file["usage"]) == (answer["text"], answer["usage"])


def test_an_unknown_or_unusable_chat_format_fails_the_load_and_names_the_registry(
        make_engine, gemma):
    engine = make_engine()
    with pytest.raises(ModelLoadError) as failed:
        engine.load(gemma_selection(gemma, chat_format="gemma-9"))
    assert failed.value.code == "load_failed"
    assert "'gemma-9' is not one of llama-cpp-python's registered chat formats" in str(failed.value)
    assert "'chatml'" in str(failed.value)  # the names that would do


def test_registered_formatter_reads_every_registered_format_of_this_llama_cpp_python():
    """The one place that reaches into llama-cpp-python's handlers: fails loudly on an upgrade
    that stops keeping the formatter where registered_formatter reads it."""
    for name in ("gemma", "chatml", "llama-2", "llama-3", "mistral-instruct", "zephyr"):
        result = registered_formatter(name)(messages=QUESTION)
        assert QUESTION[0]["content"] in result.prompt, name
    with pytest.raises(ChatFormatRefused, match="chat handler"):
        registered_formatter("functionary")  # a handler with tools: no formatter to take


def test_config_checks_the_value_before_any_worker_runs(tmp_path):
    assert load_config(None, env={"EDGE_AGENT_MODEL__CHAT_FORMAT": "gemma"}).model.chat_format
    big = tmp_path / "big.jinja"
    big.write_text("x" * (MAX_CHAT_TEMPLATE_BYTES + 1))
    for value, problem in (("no such thing!", "neither a chat format name"),
                           (str(tmp_path / "missing.jinja"), "No such file"),
                           (str(tmp_path), "not a regular file"),
                           (str(big), "more than")):
        with pytest.raises(ConfigError) as refused:
            load_config(None, env={"EDGE_AGENT_MODEL__CHAT_FORMAT": value})
        assert refused.value.code == "config_invalid" and "chat_format" in refused.value.message
        assert problem in refused.value.message, refused.value.message


def test_manifest_chat_format_is_a_name_never_a_path(gemma_dir):
    document = json.loads((gemma_dir / "manifest.json").read_text())
    document["models"][0]["chat_format"] = "../../etc/passwd"
    with pytest.raises(ManifestError) as refused:
        parse_manifest(json.dumps(document))
    assert refused.value.code == "manifest_invalid"
    assert "models[0].chat_format" in str(refused.value)
    document["models"][0]["chat_format"] = "evil.jinja"  # a name the worker would open
    with pytest.raises(ManifestError, match="not a template file"):
        parse_manifest(json.dumps(document))
    document["models"][0]["chat_format"] = "gemma"
    document["models"][0]["variants"][1]["chat_format"] = "chat\nml"
    with pytest.raises(ManifestError, match=r"models\[0\]\.variants\[1\]\.chat_format"):
        parse_manifest(json.dumps(document))


def headers_of(directory: Path):
    manifest = load_manifest(str(directory / "manifest.json"))
    return manifest, {v.file: read_gguf_file(directory / v.file) for v in manifest.model().variants}


def test_precedence_config_over_variant_over_model_over_the_gguf(gemma_dir, ladder_dir):
    manifest, headers = headers_of(gemma_dir)
    device, profile = make_device(), make_profile(target=512)

    def picked(manifest, headers, **cfg) -> tuple[str | None, str | None]:
        s = choose(device, profile, manifest, ModelConfig(pin=manifest.model().variants[0].quant,
                                                          **cfg), headers)
        return s.chat_format, s.chat_template

    assert picked(manifest, headers) == (None, "none")
    model = manifest.model()
    with_model = msgspec.structs.replace(manifest, models=[msgspec.structs.replace(
        model, chat_format="chatml")])
    assert picked(with_model, headers) == ("chatml", "manifest:chatml")
    first = msgspec.structs.replace(model.variants[0], chat_format="gemma")
    variants = [first, *model.variants[1:]]
    with_variant = msgspec.structs.replace(manifest, models=[msgspec.structs.replace(
        model, chat_format="chatml", variants=variants)])
    assert picked(with_variant, headers) == ("gemma", "manifest:gemma")
    assert picked(with_variant, headers, chat_format="zephyr") == ("zephyr", "config:zephyr")
    # SmolLM2 carries its own template: that is used unless something overrides it.
    assert picked(*headers_of(ladder_dir)) == (None, "gguf")


def test_a_daemon_answers_chat_on_gemma_and_shows_the_template_in_meta(tmp_path, gemma_dir):
    broker = Broker(tmp_path / "broker").start()
    observers = Observers(broker)
    daemon = RunningDaemon(tmp_path / "daemon", broker, gemma_dir, model={
        "manifest": str(gemma_dir / "manifest.json"), "pin": "Q4_K_M", "chat_format": "gemma",
        "n_ctx_target": 512}).start()
    try:
        wait_ready(daemon)
        observer = observers.connect(f"{BASE}/meta", f"{BASE}/reply/#")
        meta = json.loads(observer.wait_for(lambda m: m.topic == f"{BASE}/meta").payload)
        assert meta["chat_template"] == "config:gemma"
        assert meta["selection"]["quant"] == "Q4_K_M"
        observer.publish(f"{BASE}/prompt", json.dumps({
            "id": "gemma-chat", "messages": QUESTION, "max_tokens": 12, "temperature": 0}).encode())
        final = wait_final(observer, f"{BASE}/reply/gemma-chat")
        assert "error" not in final and final["usage"]["completion_tokens"] >= 1, final
        assert final["model"]["quant"] == "Q4_K_M"
    finally:
        daemon.close()
        observers.close()
        broker.stop()
