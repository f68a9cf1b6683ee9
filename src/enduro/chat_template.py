"""Chat messages → prompt text, with the model's jinja chat template or a Gemma-style default.

Templates come with model files, so they are untrusted code: they render in jinja's immutable
sandbox, which refuses attribute tricks (`__class__`, `mro`, ...) and any mutation of the
objects passed in.
"""

from collections.abc import Sequence
from datetime import datetime
from typing import NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Gemma's turn format. Gemma has no system role: a system (or developer) message is prepended
# to the first user turn, as Gemma's own template does.
DEFAULT_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- set system = namespace(text='') -%}
{%- for message in messages -%}
    {%- if message['role'] in ('system', 'developer') -%}
        {%- set system.text = system.text + message['content'] + '\n\n' -%}
    {%- else -%}
        {%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}
        {{ '<start_of_turn>' + role + '\n' }}
        {%- if role == 'user' -%}{{ system.text }}{%- set system.text = '' -%}{%- endif -%}
        {{ message['content'] | trim }}{{ '<end_of_turn>\n' }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""


# Tokens that close an assistant turn in common chat formats (Gemma, ChatML, Llama 3, Phi).
# A chat reply stops at whichever of these the vocabulary has, besides EOS.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


class ChatTemplateError(ValueError):
    """The template refused these messages; the message is safe to show the client."""


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        # Same settings as transformers' apply_chat_template, so templates render identically.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source or DEFAULT_CHAT_TEMPLATE)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # Jinja's message can quote parts of the messages; the client gets a fixed one.
            raise ChatTemplateError("the chat template could not render these messages") from exc


def _raise_exception(message: str) -> NoReturn:
    # The template author's words (e.g. "roles must alternate"), not the client's input.
    raise ChatTemplateError(f"chat template: {str(message)[:200]}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
