"""The inference worker: a child process that owns one llama_cpp.Llama.

Started by agent.runtime.engine as ``python -m agent.runtime.worker --fds IN,OUT`` and
spoken to in frames (agent.runtime.protocol) over those two pipe fds. stdout and stderr
carry only llama.cpp's own noise, never protocol data. A native crash here (SIGSEGV in a
matmul kernel, an abort in an assert, the OOM killer) ends this process, not the daemon.

Threads: the main thread loads the model and runs one generation at a time: it tokenizes
the prompt (the only place a prompt is tokenized) and refuses one longer than the context
(``too_long``); a reader thread reads frames and sets the cancel flag that the generation
checks after every token. A load is ``_load_model`` (one rung's settings to a Llama and its
chat formatter); a generation is ``Worker._generate``: ``_prepare`` (tokens, ``too_long``, the
grammar from its GrammarCache), ``_stream`` (sampling, cancel, chunk frames), ``_result``.

llama_cpp is imported only in child processes: this worker and agent.runtime.quality's
measuring child, never in the daemon. This module must not import the engine, MQTT or
anything else of the daemon (agent.config's chat-format rules are the bottom layer's).

``python -m agent.runtime.worker --build-info`` prints the llama.cpp build as JSON.

Two things llama-cpp-python has no public way for are each done in one small function below
(``_model_params``, ``_watch_sampling``), and tests/runtime/test_worker.py fails loudly when an
upgrade breaks either.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

from agent.config import MAX_CHAT_TEMPLATE_BYTES, is_chat_template_file
from agent.runtime.protocol import (
    Cancel,
    Chunk,
    Final,
    FrameReader,
    FrameWriter,
    Generate,
    Load,
    Loaded,
    LoadFailed,
    Stop,
    ToWorker,
)

_KV_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type values (ggml.h)
# The worker runs below the daemon's priority. The daemon's threads (MQTT, replies, the
# watchdog ping) wake for microseconds per token; at equal priority each waited for a time
# slice of this process's compute threads: on 2 cores up to 6 ms more before the first chunk
# reached an MQTT client. Lower, it costs inference nothing while they sleep.
WORKER_NICE = 5
# Grammars (GBNF text, or a JSON schema turned into one) kept checked and ready: IoT callers send
# the same few schemas again and again, and turning a schema into GBNF costs more than a token.
GRAMMAR_CACHE_SIZE = 64


class GrammarRefused(Exception):
    """The request's grammar or JSON schema cannot constrain sampling; the message says why."""


def build_info() -> dict[str, Any]:
    """The llama.cpp build this worker runs: version, GPU offload, system info."""
    import llama_cpp

    return {
        "version": llama_cpp.__version__,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool) -> Iterator[None]:
    """Build the Llama with ``use_extra_bufts`` set; Llama() has no argument for it.

    Extra buffer types are where ggml repacks weights for AMX and other CPU kernels; turning
    them off is the first step of the fallback ladder. Llama() builds its model params from
    ``llama_model_default_params()`` and keeps them public as ``Llama.model_params``, so the
    defaults are swapped for the duration of one construction and _load checks the result:
    a llama-cpp-python that stops reading them fails the load, not silently the ladder.
    """
    import llama_cpp.llama_cpp as bindings

    original = bindings.llama_model_default_params

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = use_extra_bufts
        return params

    bindings.llama_model_default_params = patched
    try:
        yield
    finally:
        bindings.llama_model_default_params = original


def _watch_sampling(llama: Any, sampled: list[tuple[int, float]]) -> None:
    """Append every token ``llama`` samples, and when, to ``sampled``.

    usage and timings need the exact sampled tokens (the end-of-generation one included) and
    their times; create_completion's stream reports neither, and its stopping criteria are
    called without the token. There is no public hook, so this one Llama's ``sample`` method
    is wrapped (the instance, never the class); tests/runtime/test_worker.py checks the counts
    against llama-cpp-python's own usage and fails if an upgrade stops sampling through it.
    """
    sample = llama.sample

    def timed_sample(*args: Any, **kwargs: Any) -> int:
        token = sample(*args, **kwargs)
        sampled.append((token, time.perf_counter()))
        return token

    llama.sample = timed_sample


def _token_text(vocab: Any, token: int) -> str:
    import llama_cpp

    return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8")


class ChatFormatRefused(Exception):
    """The configured chat format cannot format messages here; the message says why."""


def registered_formatter(name: str) -> Any:
    """The formatter llama-cpp-python registered as chat format ``name``.

    Its registry holds completion handlers, which run a whole completion; the worker needs
    the prompt alone (to count, stream and cancel), and there is no public way from a name to
    the formatter. A format registered with ``register_chat_format`` wraps its formatter in a
    handler that keeps it in its closure as ``chat_formatter``: read here, through inspect, and
    nowhere else; tests/runtime/test_chat_format.py fails loudly if an upgrade changes that."""
    import inspect

    from llama_cpp import llama_chat_format

    try:
        handler = llama_chat_format.get_chat_completion_handler(name)
    except llama_chat_format.LlamaChatCompletionHandlerNotFoundException as exc:
        raise ChatFormatRefused(
            f"chat_format {name[:80]!r} is not one of llama-cpp-python's registered chat "
            f"formats ({str(exc)[:600]})"
        ) from None
    formatter = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
    if not callable(formatter):
        raise ChatFormatRefused(
            f"chat_format {name[:80]!r} is a chat handler (function calling, images), not a "
            "chat format that turns messages into a prompt"
        )
    return formatter


def _read_template(path: str) -> str:
    """A Jinja chat template file, bounded like the config check (it may have grown since)."""
    with open(path, "rb") as file:
        data = file.read(MAX_CHAT_TEMPLATE_BYTES + 1)
    if len(data) > MAX_CHAT_TEMPLATE_BYTES:
        raise ChatFormatRefused(f"{path}: more than {MAX_CHAT_TEMPLATE_BYTES} bytes")
    return data.decode("utf-8")


def _configured_chat_format(settings: dict[str, Any]) -> tuple[Any, str | None]:
    """The rung's ``chat_format`` as (a registered formatter, a Jinja template's text), at most
    one of them set. Checked before the model is built: one that cannot work costs nothing."""
    chat_format = settings.get("chat_format")
    if chat_format is None:
        return None, None
    if is_chat_template_file(chat_format):
        return None, _read_template(chat_format)
    return registered_formatter(chat_format), None


def _build_llama(settings: dict[str, Any]) -> Any:
    """The Llama of one ladder rung's settings (agent.runtime.ladder)."""
    import llama_cpp

    kv = _KV_TYPES[settings.get("kv_type", "f16")]
    flash_attn = bool(settings.get("flash_attn")) or kv != _KV_TYPES["f16"]
    wanted_bufts = settings.get("use_extra_bufts", True)
    with _model_params(wanted_bufts):
        llama = llama_cpp.Llama(
            model_path=settings["model_path"],
            n_ctx=settings["n_ctx"],
            n_batch=settings["n_batch"],
            n_ubatch=settings["n_ubatch"],
            n_threads=settings["n_threads"],
            n_threads_batch=settings["n_threads"],
            n_gpu_layers=settings["n_gpu_layers"],
            use_mmap=settings.get("use_mmap", True),
            use_mlock=settings.get("use_mlock", False),
            flash_attn=flash_attn,
            type_k=kv,
            # V cache quantization needs flash attention in llama.cpp.
            type_v=kv if flash_attn else _KV_TYPES["f16"],
            seed=settings.get("seed", 0xFFFFFFFF),
            verbose=False,
        )
    if bool(llama.model_params.use_extra_bufts) != wanted_bufts:
        raise RuntimeError(f"this llama-cpp-python ignored use_extra_bufts={wanted_bufts}")
    return llama


def _load_model(settings: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The Llama of one rung's settings, its vocab (llama_vocab_p) and its chat formatter (None
    when the model has no chat template and the rung names no chat format)."""
    import llama_cpp

    named, template_text = _configured_chat_format(settings)
    llama = _build_llama(settings)
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    if named is not None:
        return llama, vocab, named
    # Precedence (config over manifest over the GGUF's own) was settled by the selector:
    # chat_format is set only when it overrides the file's template.
    template = template_text or llama.metadata.get("tokenizer.chat_template")
    return llama, vocab, _template_formatter(llama, vocab, template) if template else None


def _template_formatter(llama: Any, vocab: Any, template: str) -> Any:
    """The chat formatter of a Jinja ``template``, with the model's own BOS and EOS tokens."""
    from llama_cpp import llama_chat_format

    eos = llama.token_eos()
    bos = llama.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=_token_text(vocab, eos) if eos != -1 else "",
        bos_token=_token_text(vocab, bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )


class GrammarCache:
    """The LlamaGrammar a request asks for (``grammar`` or ``response_format``), checked once
    and kept per grammar text or schema, least recently used out first."""

    def __init__(self) -> None:
        self._grammars: OrderedDict[str, Any] = OrderedDict()  # key -> LlamaGrammar

    def lookup(self, message: Generate, vocab: Any) -> Any:
        """The request's grammar, or None when it asks for none; raises GrammarRefused."""
        from llama_cpp import llama_grammar

        form = message.response_format
        if message.grammar is not None:
            key = "gbnf:" + message.grammar
        elif form is None:
            return None
        elif form["type"] == "json_object":
            key = "json_object"
        else:
            key = "schema:" + json.dumps(form["json_schema"]["schema"], sort_keys=True)
        cached = self._grammars.get(key)
        if cached is not None:
            self._grammars.move_to_end(key)
            return cached
        if key.startswith("gbnf:"):
            text = message.grammar
        elif key == "json_object":
            text = llama_grammar.JSON_GBNF
        else:
            try:
                text = llama_grammar.json_schema_to_gbnf(key.removeprefix("schema:"))
            except Exception as exc:  # the converter asserts on what it does not support
                raise GrammarRefused(
                    f"response_format.json_schema: not a schema this runtime can enforce: "
                    f"{type(exc).__name__}: {str(exc)[:300]}"
                ) from None
        _check_grammar(text, vocab)
        grammar = llama_grammar.LlamaGrammar.from_string(text, verbose=False)
        self._grammars[key] = grammar
        while len(self._grammars) > GRAMMAR_CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar


def _check_grammar(text: str, vocab: Any) -> None:
    """llama.cpp parses a grammar only when a sampler is made from it, and llama-cpp-python
    adds the NULL sampler of a grammar it refused to the chain anyway (a crash at the first
    token). So it is parsed once here, through the public bindings;
    tests/runtime/test_grammar.py fails loudly if an upgrade changes that."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarRefused("grammar: llama.cpp cannot parse it as GBNF with a `root` rule")
    llama_cpp.llama_sampler_free(sampler)


def _timings(sampled: list[tuple[int, float]], perf: Any, prompt_tokens: int, started: float,
             finished: float) -> dict[str, float]:
    """A generation's timings from its sampled tokens' times and llama.cpp's prefill counters
    (``perf``: llama_perf_context_data); ``started`` and ``finished`` are perf_counter times."""
    ttft_s = (sampled[0][1] - started) if sampled else finished - started
    decode_s = (sampled[-1][1] - sampled[0][1]) if sampled else 0.0
    if perf.n_p_eval > 0 and perf.t_p_eval_ms > 0:
        prefill_rate = perf.n_p_eval / (perf.t_p_eval_ms / 1000)
    else:
        prefill_rate = prompt_tokens / ttft_s if ttft_s > 0 else 0.0
    return {
        "ttft_ms": round(ttft_s * 1000, 3),
        "prefill_tokens_per_s": round(prefill_rate, 2),
        "decode_tokens_per_s": round((len(sampled) - 1) / decode_s, 2)
        if decode_s > 0 and len(sampled) > 1
        else 0.0,
        "total_ms": round((finished - started) * 1000, 3),
    }


class _Prepared(NamedTuple):
    """What a generation starts from, once the request is known to fit."""

    tokens: list[int]  # the prompt, tokenized once
    stop: list[str]  # the chat format's stop strings, beside the request's
    stop_check: Any  # the chat template's stop-token check, or None
    grammar: Any  # a LlamaGrammar, or None


class Worker:
    def __init__(self, reader: FrameReader, writer: FrameWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ops: queue.Queue[Load | Generate | Stop] = queue.Queue()
        # request id -> why it must stop; set by the reader thread, read after every token.
        # A cancel can arrive before its generation starts, so it is kept until then.
        self._cancelled: dict[str, str] = {}
        # Held while the reader inserts and while the main thread sweeps: iterating the dict
        # as the reader grew it raised RuntimeError and killed the worker.
        self._cancelled_lock = threading.Lock()
        self._llama: Any = None
        self._formatter: Any = None
        self._sampled: list[tuple[int, float]] = []
        self._grammars = GrammarCache()
        self._vocab: Any = None  # llama_vocab_p of the loaded model

    # reader thread ------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            message = self._reader.receive()
            if message is None:
                # The parent is gone: a worker must never outlive its engine.
                os._exit(0)
            if isinstance(message, Cancel):
                with self._cancelled_lock:
                    self._cancelled[message.id] = message.reason
            else:
                self._ops.put(message)

    # main thread ---------------------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._read_loop, name="worker-reader", daemon=True).start()
        while True:
            message = self._ops.get()
            if isinstance(message, Stop):
                return
            if isinstance(message, Load):
                self._load(message)
            else:
                self._generate(message)

    def _load(self, message: Load) -> None:
        settings = message.settings
        rss_before = _rss_bytes()
        started = time.perf_counter()
        try:
            import llama_cpp

            rss_before = _rss_bytes()
            llama, vocab, formatter = _load_model(settings)
            _watch_sampling(llama, self._sampled)
            self._llama, self._vocab, self._formatter = llama, vocab, formatter
        except Exception as exc:
            self._writer.send(LoadFailed(message=f"{type(exc).__name__}: {exc}"))
            return
        load_ms = (time.perf_counter() - started) * 1000
        canary_text, canary_tokens = "", 0
        if message.canary_tokens:
            try:
                canary_text, canary_tokens = self._run_canary(
                    message.canary_prompt, message.canary_tokens
                )
            except Exception as exc:
                self._writer.send(LoadFailed(message=f"canary: {type(exc).__name__}: {exc}"))
                return
        self._writer.send(
            Loaded(
                load_ms=load_ms,
                rss_before=rss_before,
                rss_after=_rss_bytes(),
                n_ctx=llama.n_ctx(),
                n_ctx_train=llama_cpp.llama_model_n_ctx_train(llama.model),
                chat_template=self._formatter is not None,
                canary_text=canary_text,
                canary_tokens=canary_tokens,
            )
        )

    def _run_canary(self, prompt: str, tokens: int) -> tuple[str, int]:
        out = self._llama.create_completion(prompt, max_tokens=tokens, temperature=0.0, seed=0)
        return out["choices"][0]["text"], int(out["usage"]["completion_tokens"])

    def _prompt_tokens(self, message: Generate) -> tuple[list[int], list[str], Any]:
        """Prompt tokens, extra stop strings and a stop-token check, as the chat handler does."""
        llama = self._llama
        if message.messages is not None:
            if self._formatter is None:
                raise ValueError("the model has no chat template; send a raw prompt, or name a "
                                 "chat_format in the config (model.chat_format) or the manifest")
            result = self._formatter(messages=message.messages)
            tokens = llama.tokenize(
                result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
            )
            # Registered formats give one stop string, templates a list.
            stop = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
            return tokens, stop, result.stopping_criteria
        # special=True as create_completion does for a string: a raw prompt is the caller's
        # whole input, control tokens included, and must tokenize as it would in-process.
        prompt = message.prompt or ""
        return llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), [], None

    def _generate(self, message: Generate) -> None:
        request_id = message.id
        started = time.perf_counter()
        prepared = self._prepare(message)
        if prepared is None:
            return  # refused; its final is sent
        cancelled = self._cancels_for(request_id)
        try:
            text, finish_reason = self._stream(message, prepared, cancelled)
        except Exception as exc:
            self._final_error(request_id, "internal", f"{type(exc).__name__}: {exc}")
            return
        finally:
            reason = cancelled.pop(request_id, None)
        if reason is not None:
            code = "timeout" if reason == "timeout" else "cancelled"
            self._final_error(request_id, code, f"generation stopped: {reason}")
            return
        self._writer.send(self._result(request_id, text, finish_reason, prepared, started))

    def _prepare(self, message: Generate) -> _Prepared | None:
        """Tokenize the prompt and find its grammar; None when the request is refused
        (bad_request, too_long, bad_grammar) with its final sent."""
        request_id = message.id
        try:
            tokens, extra_stop, template_stop = self._prompt_tokens(message)
        except Exception as exc:
            self._final_error(request_id, "bad_request", f"{type(exc).__name__}: {exc}")
            return None
        n_ctx = self._llama.n_ctx()
        if len(tokens) >= n_ctx:
            self._final_error(
                request_id, "too_long", f"prompt is {len(tokens)} tokens, context is {n_ctx}",
                prompt_tokens=len(tokens), n_ctx=n_ctx,
            )
            return None
        try:
            grammar = self._grammars.lookup(message, self._vocab)
        except GrammarRefused as exc:
            self._final_error(request_id, "bad_grammar", str(exc))
            return None
        return _Prepared(tokens, extra_stop, template_stop, grammar)

    def _cancels_for(self, request_id: str) -> dict[str, str]:
        """The cancel flags, emptied of all but ``request_id``'s: cancels for requests that have
        already finished are stale now. The reader keeps inserting into this same dict."""
        with self._cancelled_lock:
            reason = self._cancelled.get(request_id)
            self._cancelled.clear()  # in place: the reader inserts into this same dict
            if reason is not None:
                self._cancelled[request_id] = reason
        return self._cancelled

    def _stream(self, message: Generate, prepared: _Prepared,
                cancelled: dict[str, str]) -> tuple[str, str]:
        """Generate, sending each piece as a chunk when the request streams and stopping once
        the request is cancelled (checked after every token); the text and finish reason."""
        import llama_cpp

        request_id = message.id
        llama = self._llama
        template_stop = prepared.stop_check
        self._sampled.clear()

        def watch(input_ids: Any, logits: Any) -> bool:
            if template_stop is not None and template_stop(input_ids, logits):
                return True
            return request_id in cancelled

        llama_cpp.llama_perf_context_reset(llama.ctx)
        text_parts: list[str] = []
        finish_reason = "length"
        seq = 0
        stream = llama.create_completion(
            prepared.tokens,
            max_tokens=message.max_tokens,
            temperature=message.temperature,
            top_p=message.top_p,
            top_k=message.top_k,
            min_p=message.min_p,
            repeat_penalty=message.repeat_penalty,
            stop=message.stop + prepared.stop,
            seed=message.seed,
            grammar=prepared.grammar,
            stream=True,
            stopping_criteria=llama_cpp.StoppingCriteriaList([watch]),
        )
        for chunk in stream:
            choice = chunk["choices"][0]
            delta = choice["text"]
            if delta:
                text_parts.append(delta)
                if message.stream:
                    self._writer.send(Chunk(id=request_id, seq=seq, delta=delta))
                    seq += 1
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
            if request_id in cancelled:
                break
        return "".join(text_parts), finish_reason

    def _result(self, request_id: str, text: str, finish_reason: str, prepared: _Prepared,
                started: float) -> Final:
        """The final of a finished generation, its usage and timings from the sampled tokens."""
        import llama_cpp

        finished = time.perf_counter()
        sampled = self._sampled
        prompt_tokens = len(prepared.tokens)
        completion = [t for t, _ in sampled if not llama_cpp.llama_vocab_is_eog(self._vocab, t)]
        perf = llama_cpp.llama_perf_context(self._llama.ctx)
        return Final(
            id=request_id,
            text=text,
            finish_reason=finish_reason,
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(completion)},
            timings=_timings(sampled, perf, prompt_tokens, started, finished),
        )

    def _final_error(self, request_id: str, code: str, message: str, **details: int) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if details:
            error["details"] = details
        self._writer.send(Final(id=request_id, error=error))


def main(argv: list[str] | None = None, worker_class: type[Worker] = Worker) -> int:
    """The worker's command line; ``worker_class`` lets a test entry point serve a subclass."""
    parser = argparse.ArgumentParser(prog="python -m agent.runtime.worker")
    parser.add_argument("--build-info", action="store_true", help="print the llama.cpp build as JSON")
    parser.add_argument("--fds", help="IN,OUT: the protocol pipe fds given by the engine")
    args = parser.parse_args(argv)
    if args.build_info:
        print(json.dumps(build_info()))
        return 0
    if not args.fds:
        parser.error("--fds is required (the engine starts this process)")
    in_fd, out_fd = (int(part) for part in args.fds.split(","))
    try:
        os.nice(WORKER_NICE)  # before any thread starts: llama.cpp's threads inherit it
    except OSError:  # the unit's SystemCallFilter (~@resources) refuses setpriority: EPERM
        print("worker: cannot lower its priority; runs at the daemon's", file=sys.stderr)
    worker_class(FrameReader(in_fd, ToWorker), FrameWriter(out_fd)).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
