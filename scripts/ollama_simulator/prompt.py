"""The prompt Ollama renders for a request: server/prompt.go and the prompt parts of routes.go.

ChatHandler puts the Modelfile MESSAGEs before the request's messages and the Modelfile
SYSTEM before both when the first request message is not a system message, then strips
<think>...</think> from earlier assistant turns of qwen3 models (filterThinkTags).
chatPrompt renders the template; with truncation on it drops messages from the front until
the prompt's tokens (llama-server's /tokenize without BOS, plus 768 per image when the model
has a vision projector) fit num_ctx, keeping the system messages it dropped and always the
last message, then tags images "[img-N]" (imageTaggedMessages) and renders again.
GenerateHandler builds [system, MESSAGEs, user] for chatPrompt (tools: an empty, non-nil
list), prepends the detokenized `context`, or executes a `template` override or the
prompt/suffix pair directly, without truncation or image tags.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from ollama_simulator.api_types import Message, Tool
from ollama_simulator.profiles import ModelProfile
from ollama_simulator.prompt_template import PromptTemplate

# chatPrompt's stand-in for a CLIP image's tokens in its truncation estimate.
PROJECTOR_IMAGE_TOKENS: Final = 768


@attrs.frozen
class Think:
    """api.ThinkValue: unset (None), a bool, or a level "high", "medium", "low", "max"."""

    value: bool | str | None = None

    @property
    def enabled(self) -> bool:
        return self.value is True or isinstance(self.value, str)

    @property
    def level(self) -> str:
        if isinstance(self.value, str):
            return self.value
        return "medium" if self.value is True else ""

    @property
    def is_set(self) -> bool:
        return self.value is not None


@attrs.frozen
class Prompt:
    """What the runner gets: the prompt text and how many media items it refers to."""

    text: str
    images: int = 0


Counter = Callable[[str], int]


def render(
    template: PromptTemplate,
    messages: Sequence[Message],
    tools: Sequence[Tool] | None,
    think: Think,
    today: datetime.date,
) -> str:
    """renderPrompt."""
    return template.execute(
        messages=messages,
        tools=tools,
        think=think.enabled,
        think_level=think.level,
        is_think_set=think.is_set,
        today=today,
    )


def _strip_thinking(content: str) -> str:
    """The content thinking.Parser.AddContent leaves of a complete message (<think> tags)."""
    stripped = content.lstrip()
    if not stripped:
        return ""
    if not stripped.startswith("<think>"):
        return "" if "<think>".startswith(stripped) else content
    after = stripped[len("<think>") :]
    if "</think>" not in after:
        return ""
    return after.split("</think>", 1)[1].lstrip()


def chat_messages(
    profile: ModelProfile, family: str, model: str, messages: Sequence[Message]
) -> list[Message]:
    """ChatHandler's msgs: MESSAGEs, then the request; SYSTEM first unless the request has one."""
    msgs = [*profile.messages, *messages]
    if messages and messages[0].role != "system" and profile.system:
        msgs.insert(0, Message("system", profile.system))
    if family == "qwen3" or model == "deepseek-r1":
        last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
        msgs = [
            attrs.evolve(m, content=_strip_thinking(m.content))
            if m.role == "assistant" and i < last_user
            else m
            for i, m in enumerate(msgs)
        ]
    return msgs


def image_tagged(messages: Sequence[Message], start: int) -> tuple[list[Message], int]:
    """imageTaggedMessages: "[img-N]" per image, replacing "[img]" when the content has one."""
    tagged = list(messages)
    media = 0
    for index in range(start, len(tagged)):
        message = tagged[index]
        prefix, content = "", message.content
        for _image in message.images:
            tag = f"[img-{media}]"
            media += 1
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        tagged[index] = attrs.evolve(message, content=prefix + content)
    return tagged, media


def chat_prompt(
    template: PromptTemplate,
    messages: Sequence[Message],
    tools: Sequence[Tool] | None,
    think: Think,
    *,
    num_ctx: int,
    truncate: bool,
    count: Counter,
    projector: bool,
    today: datetime.date,
) -> Prompt:
    """chatPrompt: truncate from the front to fit num_ctx, then render with image tags."""
    system: list[Message] = []
    current = 0
    if truncate:
        for index in range(len(messages)):
            system = [m for m in messages[:index] if m.role == "system"]
            rendered = render(template, [*system, *messages[index:]], tools, think, today)
            size = count(rendered)
            if projector:
                size += PROJECTOR_IMAGE_TOKENS * sum(len(m.images) for m in messages[index:])
            if size <= num_ctx or index == len(messages) - 1:
                current = index
                break
    tagged, media = image_tagged(messages, current)
    return Prompt(render(template, [*system, *tagged[current:]], tools, think, today), media)


def generate_prompt(
    profile: ModelProfile,
    override: PromptTemplate | None,
    *,
    prompt: str,
    system: str,
    suffix: str,
    images: tuple[bytes, ...],
    context: str | None,
    think: Think,
    num_ctx: int,
    truncate: bool,
    count: Counter,
    projector: bool,
    today: datetime.date,
) -> Prompt:
    """GenerateHandler (not raw): `context` is the detokenized text of the request's context ids."""
    template = override or profile.template
    prefix = context or ""
    if suffix:
        text = template.execute(
            prompt=prompt,
            suffix=suffix,
            think=think.enabled,
            think_level=think.level,
            is_think_set=think.is_set,
            today=today,
        )
        return Prompt(prefix + text, len(images))
    msgs: list[Message] = []
    if system or profile.system:
        msgs.append(Message("system", system or profile.system))
    if context is None:
        msgs.extend(profile.messages)
    msgs.append(Message("user", prompt, images=images))
    if override is not None:
        return Prompt(prefix + render(override, msgs, None, think, today), len(images))
    rendered = chat_prompt(
        template,
        msgs,
        (),
        think,
        num_ctx=num_ctx,
        truncate=truncate,
        count=count,
        projector=projector,
        today=today,
    )
    return Prompt(prefix + rendered.text, rendered.images)
