"""The chat app through its API (gradio_client) and its parts: prompts, streaming, loading, limits, sessions, CLI.

Replies are checked against greedy decoding of a prompt written out by hand in the YuLan-Mini-Instruct layout
(docs/yulan_reference.md section 6), so a test fails if the app renders, streams, or mixes up conversations wrongly.
"""

from __future__ import annotations

import inspect
import re
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError as ClientAppError
from gradio_client.exceptions import ValidationError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

import yulan_tune.commands.app as app_command
from yulan_tune.app import AppConfig, build_app, serve
from yulan_tune.chat_session import ChatModel, GenerationSettings, stream_replies
from yulan_tune.cli import main as cli_main
from yulan_tune.commands.app import AppError, build_parser, config_from_args, resolve_model
from yulan_tune.data.chat import tokenize_conversation

SYSTEM = "You are a careful test assistant."
STOP_IDS = [2, 106]  # </s> and <|eot_id|> at YuLan-Mini's ids
MAX_INPUT_TOKENS = 64


# ---------------------------------------------------------------------------------------------------------------------
# independent references


def hand_rendered_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The YuLan-Mini-Instruct prompt written out by hand: BOS, Llama-3 style headers, <|eot_id|> after each turn."""
    text = "<s>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
    )
    text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_reference(chat_model: ChatModel, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    ids = torch.tensor([hand_rendered_ids(chat_model.tokenizer, messages)])
    with torch.inference_mode():
        output = chat_model.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=STOP_IDS,
            pad_token_id=chat_model.tokenizer.pad_token_id,
        )
    new_ids = output[0, ids.shape[1] :].tolist()
    if new_ids and new_ids[-1] in STOP_IDS:
        new_ids = new_ids[:-1]
    return chat_model.tokenizer.decode(new_ids, skip_special_tokens=True)


def turns(chatbot_value: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of every message in a Chatbot value as gradio_client returns it."""
    result = []
    for message in chatbot_value:
        content = message["content"]
        text = content if isinstance(content, str) else "".join(part["text"] for part in content)
        result.append((message["role"], text))
    return result


def shown(reference: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What the Chatbot displays: gradio applies inspect.cleandoc (strips the edges) to the text, not to our history."""
    return [(role, inspect.cleandoc(text)) for role, text in reference]


def with_system(*messages: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": c} for r, c in messages]


def client_for(url: str, **kwargs) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """What the app command picks on 2 cores with 2 concurrent generations (cpu_threads_per_generation); restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny YuLan with its weights re-initialized: the briefly pretrained model greedily answers almost
    anything with indentation, an untrained one with word salad that depends on the prompt, which is what a test
    needs to tell one conversation's answer from another's."""
    out = tmp_path_factory.mktemp("untrained_tiny")
    shutil.copytree(tiny_dir, out, dirs_exist_ok=True)  # tokenizer, chat template, generation config
    # the tiny config carries YuLan-Mini's initializer_range (5e-5; its scale lives in WeSaR alphas): a plain Llama
    # initialised with it gives near-zero logits and the same answer to every prompt
    config = AutoConfig.from_pretrained(str(tiny_dir), initializer_range=0.02)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def chat_model(model_dir: Path) -> ChatModel:
    return ChatModel.load(model_dir)


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) A and B, so applying it visibly changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, lora).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapted_model(model_dir: Path, adapter_dir: Path) -> ChatModel:
    return ChatModel.load(model_dir, adapter=adapter_dir)


@pytest.fixture(scope="module")
def server(chat_model: ChatModel):
    config = AppConfig(temperature=0, max_new_tokens=12, max_input_tokens=MAX_INPUT_TOKENS, concurrency_limit=2)
    demo = serve(build_app([chat_model], config), config, block=False)
    yield demo
    demo.close()


# ---------------------------------------------------------------------------------------------------------------------
# prompt rendering and streaming, without gradio


def test_prompt_is_token_for_token_what_training_used(chat_model: ChatModel) -> None:
    messages = with_system(("user", "Add 3 and 4."), ("assistant", "The answer is 7."), ("user", "And 5 and 6?"))
    prompt = chat_model.prompt_ids(messages)
    assert prompt == hand_rendered_ids(chat_model.tokenizer, messages)
    assert prompt.count(1) == 1 and prompt[0] == 1  # BOS exactly once
    # SFT trains on the same tokens: the training rendering of the answered conversation starts with the prompt
    answered = messages + [{"role": "assistant", "content": "The answer is 11."}]
    assert tokenize_conversation(chat_model.tokenizer, answered).input_ids[: len(prompt)] == prompt
    assert chat_model.stop_ids == STOP_IDS


def test_stream_replies_streams_the_greedy_answer(chat_model: ChatModel) -> None:
    messages = with_system(("user", "Tell me about lists."))
    updates = list(stream_replies([chat_model], [messages], GenerationSettings(0, 1, 24)))
    final = updates[-1][0]
    assert final.text == greedy_reference(chat_model, messages, 24)
    assert (final.new_tokens, final.stop_reason) == (24, "max new tokens")
    assert final.first_token_seconds is not None and 0 < final.first_token_seconds <= final.seconds
    assert final.tokens_per_second == pytest.approx(24 / final.seconds)
    streamed = [update[0].text for update in updates[:-1] if update[0].text]
    assert len(set(streamed)) >= 2, "the answer arrived in one piece, not streamed"
    assert all(final.text.startswith(text) for text in streamed)
    assert all(update[0].stop_reason is None for update in updates[:-1])


def test_stream_replies_stops_at_a_stop_id_and_drops_it(chat_model: ChatModel) -> None:
    messages = with_system(("user", "Say something."))
    prompt = chat_model.prompt_ids(messages)
    with torch.inference_mode():
        greedy = chat_model.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                           eos_token_id=STOP_IDS, pad_token_id=102)[0, len(prompt):].tolist()
    # the tiny model rarely ends a turn by itself: make the first greedy token not seen before it a stop id instead
    # (an untrained tiny model may repeat one token: then the very first token stops it)
    cut = next((i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i]), 0)
    stopping = ChatModel(chat_model.name, chat_model.model, chat_model.tokenizer, STOP_IDS + [greedy[cut]])
    final = list(stream_replies([stopping], [messages], GenerationSettings(0, 1, 20)))[-1][0]
    assert (final.stop_reason, final.new_tokens) == ("end of turn", cut + 1)
    assert final.text == chat_model.tokenizer.decode(greedy[:cut], skip_special_tokens=True)


def test_generation_timeout_and_cancellation_stop_the_worker(chat_model: ChatModel) -> None:
    messages = with_system(("user", "Write a long story."))
    started = time.perf_counter()
    final = list(stream_replies([chat_model], [messages], GenerationSettings(0, 1, 3000), timeout_s=0.3))[-1][0]
    assert final.stop_reason == "timeout"
    assert 0 < final.new_tokens < 3000 and time.perf_counter() - started < 3

    stream = stream_replies([chat_model], [messages], GenerationSettings(0, 1, 3000))
    next(stream)
    stream.close()  # what gradio does when the browser goes away: the generate thread must stop at the next token
    assert not [t for t in threading.enumerate() if t.name.startswith("yulan-tune-generate")]


# ---------------------------------------------------------------------------------------------------------------------
# loading: full dir, base + unmerged LoRA adapter, 4-bit


def test_loads_base_plus_unmerged_lora_adapter(model_dir: Path, adapter_dir: Path, chat_model: ChatModel,
                                               adapted_model: ChatModel) -> None:
    from peft import PeftModel

    assert isinstance(adapted_model.model, PeftModel)
    assert "adapter" in adapted_model.name
    # independent merge: W + (alpha / r) * B @ A from the adapter's safetensors, into a fresh copy of the base
    merged = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    state = merged.state_dict()
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a_keys = [k for k in lora if k.endswith("lora_A.weight")]
    assert len(a_keys) == 2 * merged.config.num_hidden_layers  # q_proj and v_proj of every layer
    for key in a_keys:
        target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        state[target] += (16 / 8) * lora[key.replace("lora_A", "lora_B")] @ lora[key]
    merged.load_state_dict(state)
    ids = torch.tensor([adapted_model.prompt_ids(with_system(("user", "Hello")))])
    with torch.inference_mode():
        adapted_logits = adapted_model.model(ids).logits
        base_logits = chat_model.model(ids).logits
        torch.testing.assert_close(adapted_logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    assert (adapted_logits - base_logits).abs().max() > 0.1  # the adapter is really applied


def test_loads_4bit_model_and_a_saved_4bit_checkpoint(model_dir: Path, chat_model: ChatModel,
                                                      tmp_path: Path) -> None:
    import bitsandbytes as bnb

    quantized = ChatModel.load(model_dir, quantization="4bit")
    # saved before any forward: on CPUs with AVX512-BF16 bitsandbytes rewrites 4-bit weights into an inference layout
    # at the first eval forward, and saving converts them back with rounding (docs/stack_notes.md, bitsandbytes trap 1)
    quantized.model.save_pretrained(str(tmp_path))
    quantized.tokenizer.save_pretrained(str(tmp_path))
    assert quantized.name.endswith("(4bit)")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in quantized.model.modules()) == 7 * 4  # q k v o gate up down
    ids = torch.tensor([quantized.prompt_ids(with_system(("user", "Hello")))])
    with torch.inference_mode():
        full, nf4 = chat_model.model(ids).logits[0].float(), quantized.model(ids).logits[0].float()
    # NF4 keeps the model: its logits stay close to full precision, per position
    assert torch.nn.functional.cosine_similarity(full, nf4, dim=-1).min() > 0.9
    final = list(stream_replies([quantized], [with_system(("user", "Hi"))], GenerationSettings(0, 1, 8)))[-1][0]
    assert final.new_tokens == 8 and final.text

    # a pre-quantized 4-bit model dir (what QLoRA users save, or a published -4bit repo) loads as 4-bit by itself
    reloaded = ChatModel.load(tmp_path)
    assert reloaded.name == f"{tmp_path} (4bit)"
    with torch.inference_mode():
        torch.testing.assert_close(reloaded.model(ids).logits[0].float(), nf4, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# the API through gradio_client


def test_server_binds_localhost_only(server) -> None:
    assert AppConfig().host == "127.0.0.1"
    assert server.server_name == "127.0.0.1" and server.local_url.startswith("http://127.0.0.1:")


def test_chat_api_streams_and_keeps_multi_turn_history(server, chat_model: ChatModel) -> None:
    client = client_for(server.local_url)
    job = client.submit("What is a tuple?", SYSTEM, 0, 1, 12, api_name="/chat")
    box, chatbot, stats = job.result(timeout=60)
    reply1 = greedy_reference(chat_model, with_system(("user", "What is a tuple?")), 12)
    assert box == ""  # the message box is cleared
    assert turns(chatbot) == shown([("user", "What is a tuple?"), ("assistant", reply1)])
    assert "12 tokens" in stats and "tokens/s" in stats and "(max new tokens)" in stats
    partial = [turns(update[1])[-1][1] for update in job.outputs()[:-1]]
    assert len({text for text in partial if text}) >= 2, "no partial answers arrived: not streamed"
    assert all(inspect.cleandoc(reply1).startswith(text) for text in partial)

    _, chatbot, _ = client.predict("And a list?", SYSTEM, 0, 1, 12, api_name="/chat")
    reply2 = greedy_reference(
        chat_model, with_system(("user", "What is a tuple?"), ("assistant", reply1), ("user", "And a list?")), 12
    )
    # reply2 matches only if the session kept reply1 exactly as generated (not as displayed)
    assert turns(chatbot) == shown([("user", "What is a tuple?"), ("assistant", reply1), ("user", "And a list?"),
                                    ("assistant", reply2)])

    chatbot, stats = client.predict(SYSTEM, 0, 1, 12, api_name="/regenerate")  # greedy: the same answer again
    assert turns(chatbot)[-2:] == shown([("user", "And a list?"), ("assistant", reply2)]) and len(chatbot) == 4

    chatbot, stats = client.predict(api_name="/clear")
    assert chatbot == [] and stats == ""
    _, chatbot, _ = client.predict("Hi", "", 0, 1, 4, api_name="/chat")  # empty system prompt: no system turn
    no_system = [{"role": "user", "content": "Hi"}]
    assert turns(chatbot) == shown([("user", "Hi"), ("assistant", greedy_reference(chat_model, no_system, 4))])


def test_over_long_message_is_rejected_with_the_reason(server, chat_model: ChatModel) -> None:
    client = client_for(server.local_url)
    long_message = "numbers " * 200
    expected_tokens = len(chat_model.tokenizer(long_message, add_special_tokens=False)["input_ids"])
    assert expected_tokens > MAX_INPUT_TOKENS
    with pytest.raises(ValidationError) as error:
        client.predict(long_message, SYSTEM, 0, 1, 4, api_name="/chat")
    assert str(error.value).endswith(
        f"- message: Message too long: it is {expected_tokens} tokens and this app accepts at most "
        f"{MAX_INPUT_TOKENS} tokens per message. Shorten it and send it again."
    )
    with pytest.raises(ValidationError, match="The message is empty"):
        client.predict("  \n", SYSTEM, 0, 1, 4, api_name="/chat")
    _, chatbot, _ = client.predict("Short one.", SYSTEM, 0, 1, 4, api_name="/chat")
    assert [role for role, _ in turns(chatbot)] == ["user", "assistant"]  # the refused messages left no trace
    with pytest.raises(ClientAppError, match="Nothing to regenerate"):
        client_for(server.local_url).predict(SYSTEM, 0, 1, 4, api_name="/regenerate")


def test_sixteen_concurrent_clients_all_answered_without_cross_talk(server, chat_model: ChatModel) -> None:
    n_clients, new_tokens = 16, 8
    words = ["apple", "river", "mountain", "copper", "violin", "harbor", "lantern", "meadow", "falcon", "glacier",
             "pepper", "saddle", "thunder", "walnut", "canyon", "orchid"]
    barrier = threading.Barrier(n_clients)
    latencies: list[float] = []

    def one_session(k: int) -> tuple[list, list]:
        client = client_for(server.local_url)
        barrier.wait()  # all sixteen send their first message at once
        histories = []
        for message in (f"My code word is {words[k]}.", f"Repeat {words[k]} please."):
            started = time.perf_counter()
            _, chatbot, _ = client.predict(message, SYSTEM, 0, 1, new_tokens, api_name="/chat")
            latencies.append(time.perf_counter() - started)
            histories.append(turns(chatbot))
        return histories[0], histories[1]

    started = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(one_session, range(n_clients)))
    wall = time.perf_counter() - started
    assert len(latencies) == 2 * n_clients
    ordered = sorted(latencies)
    p50, p95 = statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]
    print(f"\n16-client load test: {2 * n_clients} requests of {new_tokens} tokens in {wall:.2f} s; latency "
          f"p50 {p50:.2f} s, p95 {p95:.2f} s, max {ordered[-1]:.2f} s")

    # the check below has power only if answers depend on the prompt (a swapped answer must look different)
    assert len({first[1][1] for first, _ in results}) >= 4 and len({second[3][1] for _, second in results}) >= 4
    for k, (first, second) in enumerate(results):
        msg1, msg2 = f"My code word is {words[k]}.", f"Repeat {words[k]} please."
        reply1 = greedy_reference(chat_model, with_system(("user", msg1)), new_tokens)
        reply2 = greedy_reference(chat_model, with_system(("user", msg1), ("assistant", reply1), ("user", msg2)),
                                  new_tokens)
        # each session sees exactly its own turns, answered as if it had been alone
        assert first == shown([("user", msg1), ("assistant", reply1)]), k
        assert second == shown([("user", msg1), ("assistant", reply1), ("user", msg2), ("assistant", reply2)]), k


def test_compare_two_models_side_by_side(chat_model: ChatModel, adapted_model: ChatModel) -> None:
    config = AppConfig(temperature=0, max_new_tokens=8)
    demo = serve(build_app([chat_model, adapted_model], config), config, block=False)
    try:
        _, left, right, stats = client_for(demo.local_url).predict("Compare us.", SYSTEM, 0, 1, 8, api_name="/chat")
    finally:
        demo.close()
    messages = with_system(("user", "Compare us."))
    base_reply, adapted_reply = greedy_reference(chat_model, messages, 8), greedy_reference(adapted_model, messages, 8)
    assert base_reply != adapted_reply
    assert turns(left) == shown([("user", "Compare us."), ("assistant", base_reply)])
    assert turns(right) == shown([("user", "Compare us."), ("assistant", adapted_reply)])
    assert stats.count("tokens/s") == 2 and adapted_model.name in stats


def test_auth_queue_limit_and_generation_timeout(chat_model: ChatModel) -> None:
    timeout_s = 2.5
    config = AppConfig(temperature=0, auth=("alice", "s3cret"), queue_size=1, concurrency_limit=1,
                       generation_timeout_s=timeout_s)
    demo = serve(build_app([chat_model], config), config, block=False)
    try:
        with pytest.raises(Exception, match="credentials were not provided"):
            client_for(demo.local_url)
        with pytest.raises(Exception, match="(?i)invalid|incorrect|credentials|login"):
            client_for(demo.local_url, auth=("alice", "wrong"))
        # three sessions, connected before the clock starts: one generates, one waits, one finds the queue full
        running, waiting, refused = (client_for(demo.local_url, auth=("alice", "s3cret")) for _ in range(3))
        long_job = running.submit("Go on forever.", SYSTEM, 0, 1, 2048, api_name="/chat")  # stopped by the timeout
        wait_for_status(long_job, "PROCESSING", "ITERATING")
        queued_job = waiting.submit("Me next.", SYSTEM, 0, 1, 2, api_name="/chat")
        wait_for_status(queued_job, "IN_QUEUE")
        with pytest.raises(Exception, match="(?i)queue is full"):
            refused.predict("Me too.", SYSTEM, 0, 1, 2, api_name="/chat")
        assert long_job.status().code.name == "ITERATING", "the long answer ended before the queue was tested"

        _, chatbot, stats = long_job.result(timeout=30)
        generated, seconds = re.search(r": (\d+) tokens in ([\d.]+) s", stats).groups()
        assert "(timeout)" in stats and 0 < int(generated) < 2048
        assert timeout_s <= float(seconds) < timeout_s + 2
        assert turns(chatbot)[-1][1]  # the part generated before the timeout is kept and shown
        assert len(queued_job.result(timeout=30)[1]) == 2  # waited, then answered
    finally:
        demo.close()


def wait_for_status(job, *statuses: str, within_s: float = 20) -> None:
    deadline = time.time() + within_s
    while job.status().code.name not in statuses:
        assert time.time() < deadline, f"job still {job.status().code.name}, expected one of {statuses}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_without_model_uses_quickstart_output_else_says_how_to_get_one(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(app_command, "REPO_ROOT", tmp_path / "repo")
    assert cli_main(["app"]) == 2
    error = capsys.readouterr().err
    assert "no --model given" in error and "make quickstart" in error and "outputs/quickstart/model" in error

    quickstart = tmp_path / "outputs" / "quickstart" / "model"
    quickstart.mkdir(parents=True)
    (quickstart / "config.json").write_text("{}")
    assert resolve_model(None) == str(quickstart)
    assert resolve_model("some/model") == "some/model"


def test_missing_paths_fail_fast_with_the_flag(tiny_dir: Path, capsys) -> None:
    assert cli_main(["app", "--model", "/no/such/model/dir"]) == 2
    assert "--model /no/such/model/dir: no such directory" in capsys.readouterr().err
    assert cli_main(["app", "--model", str(tiny_dir), "--adapter", "./no-such-adapter"]) == 2
    assert "--adapter ./no-such-adapter: no such directory" in capsys.readouterr().err


def test_cli_flags_auth_and_safe_defaults(monkeypatch) -> None:
    parse = build_parser().parse_args
    config = config_from_args(parse(["--model", "m"]))
    assert (config.host, config.auth, config.queue_size, config.concurrency_limit) == ("127.0.0.1", None, 64, 2)
    assert config_from_args(parse(["--model", "m", "--auth", "bob:pa:ss"])).auth == ("bob", "pa:ss")
    monkeypatch.setenv("YULAN_TUNE_APP_AUTH", "carol:pw")
    assert config_from_args(parse(["--model", "m"])).auth == ("carol", "pw")
    with pytest.raises(AppError, match="user:password"):
        config_from_args(parse(["--model", "m", "--auth", "nopassword"]))
    with pytest.raises(AppError, match="--queue-size must be at least 1"):
        config_from_args(parse(["--model", "m", "--queue-size", "0"]))
    compare = config_from_args(parse(["--model", "a", "--compare", "b", "--compare-adapter", "c", "--host", "0.0.0.0"]))
    assert (compare.compare, compare.compare_adapter, compare.host) == ("b", "c", "0.0.0.0")
