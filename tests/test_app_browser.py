"""The chat app in a real headless Chromium: type, watch the answer stream in, see the limits' messages.

Debian's `chromium` (installed by `make browser`, part of `make test`) driven by Playwright through
`executable_path`: no browser download. Screenshots go to tests/artifacts/ (gitignored) for a human to look at.
"""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from yulan_tune.app import AppConfig, build_app, serve
from yulan_tune.chat_session import ChatModel

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SYSTEM = "You are a careful test assistant."
NEW_TOKENS = 32
MAX_INPUT_TOKENS = 64
STOP_IDS = [2, 106]
CANDIDATE_MESSAGES = ["What does a Python dictionary do?", "Write a function that opens a file.", "import os",
                      "Explain the return statement.", "def main():"]

# Records the last bot message's text on every DOM change of the chatbot, to see the answer arrive in pieces.
RECORD_STREAM = """() => {
  window.botTexts = [];
  const chatbot = document.querySelector('#chatbot-0');
  new MutationObserver(() => {
    const bots = chatbot.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.botTexts.push(bots[bots.length - 1].innerText);
  }).observe(chatbot, {childList: true, subtree: true, characterData: true});
}"""
ANSWER_DONE = """() => {
  const stats = document.querySelector('#stats');
  return stats && stats.innerText.includes('tokens/s') && !stats.innerText.includes('generating');
}"""


def letters_and_digits(text: str) -> str:
    """Compare through Markdown rendering: it may drop or restyle punctuation, never letters or digits."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def greedy_reference(chat_model: ChatModel, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[str, int]:
    """Greedy answer to the YuLan-Mini-Instruct prompt written out by hand (docs/yulan_reference.md section 6)."""
    text = "<s>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
    ) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = torch.tensor([chat_model.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        output = chat_model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=max_new_tokens, eos_token_id=STOP_IDS, pad_token_id=102)
    new_ids = output[0, ids.shape[1]:].tolist()
    kept = new_ids[:-1] if new_ids and new_ids[-1] in STOP_IDS else new_ids
    return chat_model.tokenizer.decode(kept, skip_special_tokens=True), len(new_ids)


@pytest.fixture(scope="module")
def model_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny YuLan with its weights re-initialized: the briefly pretrained model greedily answers almost
    anything with indentation, an untrained one with word salad that depends on the prompt, which is what a test
    needs to tell one conversation's answer from another's."""
    out = tmp_path_factory.mktemp("untrained_tiny")
    shutil.copytree(tiny_dir, out, dirs_exist_ok=True)  # tokenizer, chat template, generation config
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(str(tiny_dir))).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def chat_model(model_dir: Path) -> ChatModel:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # what the app command picks on 2 cores with 2 concurrent generations
    yield ChatModel.load(model_dir)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def app_url(chat_model: ChatModel):
    config = AppConfig(system_prompt=SYSTEM, temperature=0, max_new_tokens=NEW_TOKENS,
                       max_input_tokens=MAX_INPUT_TOKENS)
    demo = serve(build_app([chat_model], config), config, block=False)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(app_url: str):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is not installed at {CHROMIUM}: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        page.wait_for_selector("#message textarea", timeout=30_000)
        yield page
        browser.close()


def visible_prompt(chat_model: ChatModel) -> tuple[str, str, int]:
    """A message whose greedy answer shows letters by mid-answer and more after (a tiny model may answer with
    indentation only), with that answer and its token count: the streaming check needs something to see."""
    for message in CANDIDATE_MESSAGES:
        conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
        half, _ = greedy_reference(chat_model, conversation, NEW_TOKENS // 2)
        full, new_tokens = greedy_reference(chat_model, conversation, NEW_TOKENS)
        if letters_and_digits(half) and letters_and_digits(full) != letters_and_digits(half):
            return message, full, new_tokens
    raise AssertionError(f"no candidate message gets a visible, growing greedy answer: {CANDIDATE_MESSAGES}")


def test_browser_types_a_message_and_sees_the_answer_stream_in(page, chat_model: ChatModel) -> None:
    message, expected, new_tokens = visible_prompt(chat_model)
    page.evaluate(RECORD_STREAM)
    page.fill("#message textarea", message)
    page.press("#message textarea", "Enter")
    page.wait_for_function(ANSWER_DONE, timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "app_chat.png"), full_page=True)

    assert page.inner_text('#chatbot-0 [data-testid="user"]').strip() == message
    answer = page.inner_text('#chatbot-0 [data-testid="bot"]')
    assert letters_and_digits(answer) == letters_and_digits(inspect.cleandoc(expected)) != ""
    assert f": {new_tokens} tokens in " in page.inner_text("#stats")
    assert page.input_value("#message textarea") == ""  # cleared for the next message

    seen = [letters_and_digits(text) for text in page.evaluate("window.botTexts")]
    partial = {text for text in seen if text and text != letters_and_digits(answer)}
    assert partial, f"the answer appeared at once, not streamed ({len(seen)} DOM updates)"
    assert all(letters_and_digits(answer).startswith(text) for text in partial)


def test_browser_shows_why_an_over_long_message_is_refused(page, chat_model: ChatModel) -> None:
    bots_before = page.locator('#chatbot-0 [data-testid="bot"]').count()
    long_message = "numbers " * 200
    tokens = len(chat_model.tokenizer(long_message, add_special_tokens=False)["input_ids"])
    page.fill("#message textarea", long_message)
    page.press("#message textarea", "Enter")
    reason = page.locator("#message .validation-error").first
    reason.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "app_too_long.png"), full_page=True)
    assert reason.inner_text() == (f"Message too long: it is {tokens} tokens and this app accepts at most "
                                   f"{MAX_INPUT_TOKENS} tokens per message. Shorten it and send it again.")
    assert page.input_value("#message textarea") == long_message  # kept, so the user can shorten it
    assert page.locator('#chatbot-0 [data-testid="bot"]').count() == bots_before
