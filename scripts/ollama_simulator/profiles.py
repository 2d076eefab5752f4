"""What an installed model is made of, as `ollama show` reports it: template, SYSTEM, PARAMETERs.

A profile stands for one model layer set: the Go template (the real text Ollama ships or
the registry serves), the Modelfile SYSTEM and MESSAGEs, the PARAMETERs (`params` layer)
and the GGUF facts /api/show lists (architecture, trained context length). The templates
live next to this module in templates/ (scripts/template_fixtures renders them with Go).

  llama3.2   the registry's llama3.2 template (blob 966de95ca8a6): "Cutting Knowledge Date"
             preamble, tools in the last user turn; context_length 131072
  assistant  Ollama's template/chatml.gotmpl with a long Modelfile SYSTEM, two MESSAGEs and
             PARAMETER num_ctx 8192 (what `ollama create` of a persona looks like)
  qwen3      the registry's qwen3 template (as `ollama show qwen3:8b --template` prints it):
             "# Tools ... <tools></tools>" preamble, <think> tags, /think and /no_think;
             context_length 40960
  embedding  a bert sentence embedder (all-minilm): no chat template; context_length 512
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any, Final

import attrs

from ollama_simulator.api_types import Message
from ollama_simulator.prompt_template import PromptTemplate, parse_template


def _template(name: str) -> str:
    return (resources.files("ollama_simulator") / "templates" / f"{name}.gotmpl").read_text(encoding="utf-8")


@attrs.frozen
class ModelProfile:
    """The layers and GGUF facts of one kind of model."""

    name: str
    architecture: str
    parameter_size: str
    quantization_level: str
    size: int
    context_length: int
    embedding_length: int
    block_count: int
    parameter_count: int
    template_text: str
    system: str = ""
    messages: tuple[Message, ...] = ()
    # Modelfile PARAMETERs in the order `ollama show` prints them; a list repeats the key.
    parameters: tuple[tuple[str, Any], ...] = ()
    embedding: bool = False
    template: PromptTemplate = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "template", parse_template(self.template_text))

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Model.Capabilities: completion from the GGUF, then what the template shows."""
        if self.embedding:
            return ("embedding",)
        return ("completion", *self.template.capabilities())

    @property
    def options(self) -> dict[str, Any]:
        """The params layer as Ollama decodes it (numbers are float64, lists stay lists)."""
        return dict(self.parameters)

    def model_info(self) -> dict[str, Any]:
        arch = self.architecture
        return {
            "general.architecture": arch,
            "general.file_type": 1 if self.quantization_level == "F16" else 15,
            "general.parameter_count": self.parameter_count,
            "general.quantization_version": 2,
            f"{arch}.block_count": self.block_count,
            f"{arch}.context_length": self.context_length,
            f"{arch}.embedding_length": self.embedding_length,
        }


ASSISTANT_SYSTEM: Final = (
    "You are Atlas, the in-house assistant of a mid-sized engineering company. You answer "
    "questions from colleagues about the company’s internal tools, the build pipeline, the "
    "on-call rota and the coding guidelines. Follow these rules, in this order:\n"
    "1. Be accurate. If you do not know something, say so plainly and suggest who might know "
    "(the platform team for CI, the security team for access requests, the SRE rota for "
    "incidents). Never invent a command, a flag, a URL or a ticket number.\n"
    "2. Be brief. Lead with the answer, then the reasoning, then any caveats. Prefer short "
    "paragraphs and numbered steps over long prose; use code blocks for commands.\n"
    "3. Be careful with secrets. Never repeat a password, a token or a private key that "
    "appears in a message, even partially; tell the sender to rotate it instead.\n"
    "4. Respect scope. You help with work topics only. Politely decline requests for legal, "
    "medical or financial advice, and anything that would bypass a review or an approval.\n"
    "5. Format for the chat window: no tables wider than 80 columns, no HTML, and escape "
    "angle brackets in examples (write &lt;name&gt; rather than <name>).\n"
    "When a question is ambiguous, ask one clarifying question before answering. When you "
    "cite a guideline, quote its title in “double quotes” so colleagues can search for it."
)


LLAMA32: Final = ModelProfile(
    name="llama3.2",
    architecture="llama",
    parameter_size="3.2B",
    quantization_level="Q4_K_M",
    size=2_019_393_189,
    context_length=131_072,
    embedding_length=3072,
    block_count=28,
    parameter_count=3_212_749_888,
    template_text=_template("llama3.2"),
    parameters=(("stop", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),),
)


ASSISTANT: Final = ModelProfile(
    name="assistant",
    architecture="qwen2",
    parameter_size="1.5B",
    quantization_level="Q4_K_M",
    size=986_061_892,
    context_length=32_768,
    embedding_length=1536,
    block_count=28,
    parameter_count=1_543_714_304,
    template_text=_template("chatml"),
    system=ASSISTANT_SYSTEM,
    messages=(
        Message("user", "Who are you?"),
        Message("assistant", "I am Atlas, the company assistant. Ask me about our tools and guidelines."),
    ),
    parameters=(
        ("num_ctx", 8192.0),
        ("stop", ["<|im_start|>", "<|im_end|>"]),
        ("temperature", 0.7),
    ),
)


QWEN3: Final = ModelProfile(
    name="qwen3",
    architecture="qwen3",
    parameter_size="8.2B",
    quantization_level="Q4_K_M",
    size=5_225_388_164,
    context_length=40_960,
    embedding_length=4096,
    block_count=36,
    parameter_count=8_190_735_360,
    template_text=_template("qwen3"),
    parameters=(
        ("repeat_penalty", 1.0),
        ("stop", ["<|im_start|>", "<|im_end|>"]),
        ("temperature", 0.6),
        ("top_k", 20.0),
        ("top_p", 0.95),
    ),
)


EMBEDDING: Final = ModelProfile(
    name="embedding",
    architecture="bert",
    parameter_size="23M",
    quantization_level="F16",
    size=45_960_996,
    context_length=512,
    embedding_length=384,
    block_count=6,
    parameter_count=22_565_760,
    template_text="{{ .Prompt }}",
    embedding=True,
)


PROFILES: Final[Mapping[str, ModelProfile]] = {p.name: p for p in (LLAMA32, ASSISTANT, QWEN3, EMBEDDING)}


_THINKING_FAMILIES: Final = ("qwen3", "deepseek-r1", "gpt-oss", "magistral", "phi4-reasoning")


_EMBEDDING_MARKERS: Final = ("minilm", "embed", "bge", "e5-")


def profile_for(model: str) -> ModelProfile:
    """The name rule: embedders by name, thinking families, `assistant*` personas, else llama3.2."""
    base = model.lower()
    if any(marker in base for marker in _EMBEDDING_MARKERS):
        return EMBEDDING
    if base.startswith(_THINKING_FAMILIES):
        return QWEN3
    if base.startswith("assistant"):
        return ASSISTANT
    return LLAMA32
