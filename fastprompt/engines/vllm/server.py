"""``fastprompt serve``: vLLM's OpenAI-compatible server, where ``model=NAME`` selects a prompt-learning adapter.

vLLM's own launcher pieces run (argument parser, engine client, app, state, HTTP server); one thing is added
between building the app state and serving: the request renderer that both ``/v1/completions`` and
``/v1/chat/completions`` go through is wrapped so that a request whose ``model`` names an adapter gets, after its
text is tokenized (and, for chat, after the chat template is applied), the adapter's placeholders in front, its
cache salt and the connector's parameters. Everything else is vLLM's: the adapters are extra served model names
(so ``/v1/models`` lists them and an unknown name is vLLM's 404 naming the valid ones), streaming, sampling, errors.

Why a launcher and not a ``vllm serve`` plugin: vLLM's endpoint plugins may add routes but not reach into request
processing, and a general plugin would have to patch the renderer class for every server of that environment;
this wraps one renderer instance of one server that asked for it.
"""

from __future__ import annotations

import argparse
import contextvars
import json
from collections.abc import Sequence
from typing import Any

import torch

from fastprompt.engines.vllm.adapters import BASE, PromptAdapters
from fastprompt.engines.vllm.connector import PARAM_KEY

__all__ = ["add_arguments", "main", "route_adapters"]


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """fastprompt's own options of ``fastprompt serve``; every other option goes to ``vllm serve``'s parser."""
    parser.add_argument("model", help="the base model's folder (or hub name), as vLLM loads it")
    parser.add_argument(
        "--adapter", type=_adapter, action="append", default=[], metavar="NAME=PATH", dest="adapters",
        help="serve a PEFT prompt-learning adapter folder or an exported prefix file (.safetensors) as model NAME; "
        "repeatable",
    )
    parser.add_argument(
        "--prefix-dir", metavar="DIR",
        help="where the adapters' compiled prefixes are written (default: a temporary directory)",
    )


# The adapter of the request being handled: vLLM handles each request in its own task, from rendering to the response,
# so the response can name the adapter the request asked for (vLLM's would name the base model).
_ADAPTER: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastprompt_adapter", default=None)


def route_adapters(renderer: Any, models: Any, adapters: PromptAdapters, max_model_len: int) -> None:
    """Wrap ``renderer`` (vLLM's ``OnlineRenderer`` of one server) so that requests naming an adapter are rendered
    with its placeholders in front, its cache salt and the connector's parameters; plain requests lose any
    connector parameters a client sent, so a client can never make the connector claim its own tokens. ``models``
    (vLLM's ``OpenAIServingModels``) then names the adapter in the responses."""
    render_completion, render_chat = renderer.render_completion, renderer.render_chat
    model_name = models.model_name

    def response_name(lora_request: Any = None) -> str:
        adapter = _ADAPTER.get()
        return model_name(lora_request) if adapter is None or lora_request is not None else adapter

    def claim(request: Any) -> Any:
        name = request.model if request.model in adapters.entries else BASE
        params = dict(request.kv_transfer_params or {})
        params.pop(PARAM_KEY, None)
        if name != BASE:
            # Both would run without the connector's parameters reaching it (prompt logprobs read no cache; beam
            # search builds its own requests), so the placeholders would run as tokens: refused, never wrong.
            if request.prompt_logprobs is not None or (getattr(request, "echo", False) and request.logprobs):
                return renderer.create_error_response(
                    f"prompt logprobs are not available under adapter {name!r}", param="prompt_logprobs"
                )
            if getattr(request, "use_beam_search", False):
                return renderer.create_error_response(
                    f"beam search is not available under adapter {name!r}", param="use_beam_search"
                )
            params.update(adapters.kv_transfer_params(name))
        request.kv_transfer_params = params or None
        _ADAPTER.set(None if name == BASE else name)
        return name

    def prefixed(name: str, engine_inputs: list[dict[str, Any]]) -> Any:
        if name == BASE:
            return engine_inputs
        length = adapters.prefix_length(name)
        for engine_input in engine_inputs:
            tokens = engine_input["prompt_token_ids"]
            if length + len(tokens) > max_model_len:
                return renderer.create_error_response(
                    f"the prompt has {len(tokens)} tokens and adapter {name!r} takes {length} positions: "
                    f"{length + len(tokens)} > max_model_len {max_model_len}",
                    param="prompt",
                )
            engine_input["prompt_token_ids"] = [adapters.placeholder_id] * length + list(tokens)
            if engine_input.get("prompt_token_offsets") is not None:
                engine_input["prompt_token_offsets"] = [(0, 0)] * length + list(engine_input["prompt_token_offsets"])
            engine_input["cache_salt"] = adapters.entries[name].salt
        return engine_inputs

    async def completion(request: Any, **kwargs: Any) -> Any:
        name = claim(request)
        if not isinstance(name, str):
            return name
        if request.prompt_embeds is not None and name != BASE:
            return renderer.create_error_response("prompt_embeds cannot follow an adapter's prefix", param="model")
        rendered = await render_completion(request, **kwargs)
        return rendered if not isinstance(rendered, list) else prefixed(name, rendered)

    async def chat(request: Any, **kwargs: Any) -> Any:
        name = claim(request)
        if not isinstance(name, str):
            return name
        rendered = await render_chat(request, **kwargs)
        if not isinstance(rendered, tuple):
            return rendered
        conversation, engine_inputs = rendered
        engine_inputs = prefixed(name, engine_inputs)
        return engine_inputs if not isinstance(engine_inputs, list) else (conversation, engine_inputs)

    renderer.render_completion, renderer.render_chat = completion, chat
    models.model_name = response_name


async def _serve(args: argparse.Namespace, adapters: PromptAdapters) -> None:
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        tasks = await engine_client.get_supported_tasks()
        app = build_app(args, tasks, engine_client.model_config)
        await init_app_state(engine_client, app.state, args, tasks)
        route_adapters(
            app.state.online_renderer, app.state.openai_serving_models, adapters,
            engine_client.model_config.max_model_len,
        )
        print(f"fastprompt serve: {listen_address}, adapters {adapters.names}", flush=True)
        shutdown = await serve_http(
            app, sock=sock, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log, timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        )
    try:
        await shutdown
    finally:
        sock.close()


def _parse(model: str, vllm_argv: Sequence[str]) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="fastprompt serve")).parse_args([*vllm_argv, "--model", model])
    args.model_tag = None  # the model is fastprompt's positional argument, set above
    return args


def prefix_dtype(model: str, vllm_argv: Sequence[str]) -> torch.dtype:
    """The dtype the prefixes are compiled in: ``--dtype`` of ``vllm_argv``, float32 for ``auto`` (so vLLM runs the
    model in the dtype of the prefixes, whatever its checkpoint holds)."""
    name = _parse(model, vllm_argv).dtype
    if name == "auto":
        return torch.float32
    dtype = {"half": torch.float16, "float": torch.float32}.get(name, getattr(torch, name, None))
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype {name}: not a torch dtype")
    return dtype


def vllm_args(options: argparse.Namespace, vllm_argv: Sequence[str], adapters: PromptAdapters) -> argparse.Namespace:
    """``vllm serve``'s parsed arguments for ``vllm_argv``, with the adapters' dtype, connector and prefix caching
    set, and the adapters as served model names after the base model's; ``ValueError`` when a name is both."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    fixed = ["--dtype", str(adapters.dtype).removeprefix("torch."), "--enable-prefix-caching",
             "--kv-transfer-config", json.dumps(adapters.kv_transfer_config())]
    args = _parse(options.model, [*vllm_argv, *fixed])
    served = list(args.served_model_name or [options.model])
    clash = set(served) & set(adapters.entries)
    if clash:
        raise ValueError(f"{sorted(clash)} name both the base model and an adapter")
    args.served_model_name = [*served, *adapters.names]
    validate_parsed_serve_args(args)
    return args


def main(options: argparse.Namespace, vllm_argv: Sequence[str]) -> int:
    """Compile the adapters, then run the server until it is stopped."""
    import uvloop

    dtype = prefix_dtype(options.model, vllm_argv)
    adapters = PromptAdapters(options.model, dict(options.adapters), dtype=dtype, directory=options.prefix_dir)
    uvloop.run(_serve(vllm_args(options, vllm_argv, adapters), adapters))
    return 0
