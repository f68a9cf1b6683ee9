"""Deterministic request generators shared by `enduro soak` and the serving benchmarks.

Every generator draws from a seeded `random.Random`, so a seed fixes the requests (and an agent
session's requests, given the same replies). Text is plain English words; token counts are
approximate: a word of this list counts as 1.1 tokens (`TOKENS_PER_WORD`, measured with Gemma 3's
tokenizer, sentence punctuation included); other tokenizers give up to ~1.3, i.e. ~20 % more.

Shapes (DESIGN.md, "Workloads"): chat ≈128 tokens in / 128 out; long ≈1,024 in / 64 out; prefill
≈512 in / 1 out (prompt processing alone, through the completions endpoint); agent =
multi-step sessions of a phone/GUI agent over a long shared system prompt; mixed = all of these,
streaming and not, plus client aborts and ≈5 % invalid requests that must get a 400.
"""

import random
from dataclasses import dataclass
from typing import Any, Literal, Protocol

TOKENS_PER_WORD = 1.1
Endpoint = Literal["chat", "completions"]
WorkloadName = Literal["chat", "long", "prefill", "agent", "mixed"]

_WORD_TEXT = (
    "the a of and to in is it that was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound "
    "no most people my over know water than call first who may down side been now find any "
    "new work part take get place made live where after back little only round man year came "
    "show every good me give our under name very through just form sentence great think say "
    "help low line differ turn cause much mean before move right boy old too same tell does "
    "set three want air well also play small end put home read hand port large spell add even "
    "land here must big high such follow act why ask men change went light kind off need house "
    "picture try us again animal point mother world near build self earth father head stand own "
    "page should country found answer school grow study still learn plant cover food sun four "
    "between state keep eye never last let thought city tree cross farm hard start might story "
    "saw far sea draw left late run while press close night real life few north open seem"
)
WORDS = tuple(_WORD_TEXT.split())
APPS = ("Settings", "Clock", "Maps", "Messages", "Camera", "Calendar", "Notes", "Music", "Weather")
GOALS = ("set an alarm for", "find the way to", "send a note about", "turn on", "look up")

# ≈650 tokens: the action language and reply format of an Open-AutoGLM-like phone agent. Fixed
# text, so every session shares it and the prefix cache can serve it.
_ACTIONS = """\
You are a phone agent. You see the screen of an Android phone as a text description and you \
reach the user's goal one action at a time. Each reply has two parts. First think inside \
<think> and </think>: say what the screen shows, what the goal needs next, and which element \
to use. Then give exactly one action inside <answer> and </answer>, written as do(action=...).
The actions you may use:
do(action="Launch", app="name") opens an app by its name. Use it first when the goal needs an \
app that is not on the screen, and never to switch between two screens of the same app.
do(action="Tap", element=[x,y]) taps the point x, y, where both run from 0 to 1000 across the \
width and the height of the screen. Tap the middle of a button, never its edge.
do(action="Type", text="words") types the words into the field that has the focus. Tap the \
field first when no field has the focus, and clear old text before you type new text.
do(action="Swipe", start=[x1,y1], end=[x2,y2]) swipes from the start point to the end point \
to scroll a list or move between pages. Swipe up to see more of a list.
do(action="Long Press", element=[x,y]) presses and holds the point x, y to open a menu.
do(action="Back") goes back to the previous screen or closes a menu.
do(action="Finish", message="words") ends the task and tells the user what was done.
Rules you must follow:
"""
_RULES = (
    "Give one action per reply and never two.",
    "Check that the last action worked before you take the next one.",
    "When a screen is loading, wait by swiping a little and look again.",
    "When a popup asks for a permission that the goal needs, allow it.",
    "When you are lost, go back to the home screen and launch the app again.",
    "Never buy, pay or delete anything the goal did not ask for.",
    "When the goal is done, finish at once with a short message.",
)


def _fill(rng: random.Random, num_words: int) -> str:
    """`num_words` random words as sentences of 6 to 14 words."""
    sentences: list[str] = []
    while num_words > 0:
        length = min(num_words, rng.randint(6, 14))
        words = [rng.choice(WORDS) for _ in range(length)]
        sentences.append(" ".join(words).capitalize() + ".")
        num_words -= length
    return " ".join(sentences)


def text_of_tokens(rng: random.Random, num_tokens: int) -> str:
    """Plain English text of about `num_tokens` tokens (at TOKENS_PER_WORD)."""
    return _fill(rng, max(1, round(num_tokens / TOKENS_PER_WORD)))


def _system_prompt() -> str:
    rules = "\n".join(f"{i}. {rule}" for i, rule in enumerate(_RULES, 1))
    # Extra guidance from a fixed seed brings the prompt to ≈650 tokens; same text every run.
    guidance = _fill(random.Random(650), 150)
    return f"{_ACTIONS}{rules}\nMore guidance from past tasks: {guidance}"


SYSTEM_PROMPT = _system_prompt()


@dataclass
class WorkloadRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    """The JSON body without `model` and `stream` (the client sets those)."""
    stream: bool
    abort_after_tokens: int | None = None
    """Close the stream after this many token chunks (a client abort); None: read it all."""
    expect_error: bool = False
    """An invalid request: the server must answer 400."""


def _body(endpoint: Endpoint, prompt: str, max_tokens: int) -> dict[str, Any]:
    if endpoint == "chat":
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    return {"prompt": prompt, "max_tokens": max_tokens}


def chat_request(
    rng: random.Random,
    endpoint: Endpoint = "chat",
    stream: bool = True,
    prompt_tokens: int = 128,
    max_tokens: int = 128,
) -> WorkloadRequest:
    return WorkloadRequest(
        endpoint, _body(endpoint, text_of_tokens(rng, prompt_tokens), max_tokens), stream
    )


def long_request(
    rng: random.Random, endpoint: Endpoint = "completions", stream: bool = True
) -> WorkloadRequest:
    return chat_request(rng, endpoint, stream, prompt_tokens=1024, max_tokens=64)


def prefill_request(rng: random.Random) -> WorkloadRequest:
    """A 512-token prompt and one output token: its time to first token is the prefill's."""
    return chat_request(rng, "completions", prompt_tokens=512, max_tokens=1)


def bad_request(rng: random.Random) -> WorkloadRequest:
    """An invalid request: a negative max_tokens, a field of the wrong type, or a prompt that is
    not a string. The server must answer each with a 400."""
    prompt = text_of_tokens(rng, 16)
    choices: list[tuple[Endpoint, dict[str, Any]]] = [
        ("completions", {"prompt": prompt, "max_tokens": -1}),
        ("chat", {**_body("chat", prompt, 16), "max_tokens": -1}),
        ("completions", {"prompt": prompt, "max_tokens": 16, "temperature": "hot"}),
        ("chat", {**_body("chat", prompt, 16), "n": "two"}),
        ("completions", {"prompt": {"text": prompt}, "max_tokens": 16}),
        ("chat", {"messages": prompt, "max_tokens": 16}),
    ]
    endpoint, body = rng.choice(choices)
    return WorkloadRequest(endpoint, body, stream=False, expect_error=True)


class Session(Protocol):
    """Requests that depend on the replies before them; a plain request is a one-step session."""

    def next_request(self) -> WorkloadRequest | None:
        """The next request, or None when the session is over."""

    def add_reply(self, text: str, prompt_tokens: int | None) -> None:
        """The reply to the last request (its text and the server's prompt token count)."""


class SingleRequest:
    def __init__(self, request: WorkloadRequest) -> None:
        self._request: WorkloadRequest | None = request

    def next_request(self) -> WorkloadRequest | None:
        request, self._request = self._request, None
        return request

    def add_reply(self, text: str, prompt_tokens: int | None) -> None:
        pass


AGENT_STEPS = (4, 30)
"""Steps of an agent session, drawn evenly."""


class AgentSession:
    """One phone-agent task: [system] + [task + step 1] + (assistant, user) per step.

    The newest user turn carries a screen description of ≈300–500 tokens; at the next step it is
    cut to its first line (step number, current app). So request k+1 extends request k's
    messages up to, not including, its last user turn: the prefix a cache can reuse.
    """

    # Prompt tokens kept free for the next step: a reply (≤200), a screen (≤~700 real tokens),
    # the next reply's max_tokens (≤200), with margin.
    CONTEXT_RESERVE = 1200

    def __init__(
        self, rng: random.Random, num_steps: int, max_model_len: int | None = None
    ) -> None:
        self.rng = rng
        self.num_steps = num_steps
        self.max_model_len = max_model_len
        self.app = rng.choice(APPS)
        self.task = f"Task: open {self.app} and {rng.choice(GOALS)} {text_of_tokens(rng, 12)}"
        self.messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        self.num_done = 0
        self.over = False

    def next_request(self) -> WorkloadRequest | None:
        if self.over or self.num_done >= self.num_steps:
            return None
        step = self.num_done + 1
        if self.rng.random() < 0.2:
            self.app = self.rng.choice(APPS)
        header = f"Step {step}. Current app: {self.app}."
        screen = (
            f"{header}\n** Screen Info **\n{text_of_tokens(self.rng, self.rng.randint(300, 500))}"
        )
        self._strip_last_screen()
        self.messages.append({"role": "user", "content": self._user_text(step, screen)})
        body = {
            "messages": [dict(message) for message in self.messages],
            "max_tokens": self.rng.randint(60, 200),
            "temperature": 0.0,
            "top_p": 0.85,
            "frequency_penalty": 0.2,
        }
        return WorkloadRequest("chat", body, stream=True)

    def join_at(self, step: int) -> None:
        """Start at `step` as if steps 1 .. step-1 had run: their turns are made up (screens cut
        to their headers, replies of 60–200 tokens in the agent's format). A soak whose first
        sessions join at random steps starts with the mix of context lengths it keeps later,
        so its first and last minutes compare like with like."""
        for _ in range(step - 1):
            request = self.next_request()
            if request is None:
                return
            thought = text_of_tokens(self.rng, self.rng.randint(40, 170))
            x, y = self.rng.randint(0, 1000), self.rng.randint(0, 1000)
            action = f'do(action="Tap", element=[{x},{y}])'
            self.add_reply(f"<think>{thought}</think><answer>{action}</answer>", None)

    def add_reply(self, text: str, prompt_tokens: int | None) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.num_done += 1
        limit = self.max_model_len
        if limit is not None and prompt_tokens is not None:
            self.over = prompt_tokens + self.CONTEXT_RESERVE > limit

    def _user_text(self, step: int, screen: str) -> str:
        return f"{self.task}\n\n{screen}" if step == 1 else screen

    def _strip_last_screen(self) -> None:
        last = self.messages[-1]
        if last["role"] != "assistant":
            return
        user = self.messages[-2]
        task, separator, screen = user["content"].rpartition("\n\n")
        header = screen.split("\n", 1)[0]
        user["content"] = f"{task}{separator}{header}"


class Workload:
    """Sessions of one workload, drawn from one seeded generator."""

    def __init__(self, name: WorkloadName, seed: int = 0, max_model_len: int | None = None) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.max_model_len = max_model_len

    def next_session(self, joining: bool = False) -> Session:
        """The next session. `joining`: an agent session caught at a random point of its life,
        as a load that has run for a while would hold it (`AgentSession.join_at`)."""
        # Each session gets its own generator, so its text does not depend on how the
        # sessions' requests interleave.
        rng = random.Random(self.rng.getrandbits(64))
        if self.name == "chat":
            return SingleRequest(chat_request(rng))
        if self.name == "long":
            return SingleRequest(long_request(rng))
        if self.name == "prefill":
            return SingleRequest(prefill_request(rng))
        if self.name == "agent":
            if not joining:
                num_steps = rng.randint(*AGENT_STEPS)
                return AgentSession(rng, num_steps, max_model_len=self.max_model_len)
            # A session running at a random moment is one of n steps with odds in proportion
            # to n (longer sessions cover more moments), at a step drawn evenly from 1 .. n.
            lengths = range(AGENT_STEPS[0], AGENT_STEPS[1] + 1)
            num_steps = rng.choices(lengths, weights=lengths)[0]
            session = AgentSession(rng, num_steps, max_model_len=self.max_model_len)
            session.join_at(self._joining_step(rng, num_steps))
            return session
        return self._mixed(rng)

    def _joining_step(self, rng: random.Random, num_steps: int) -> int:
        step = rng.randint(1, num_steps)
        if self.max_model_len is not None:
            # Made-up steps add ≈140 tokens each; keep the context inside the model.
            room = self.max_model_len - AgentSession.CONTEXT_RESERVE - 1000
            step = max(1, min(step, room // 140))
        return step

    def _mixed(self, rng: random.Random) -> Session:
        draw = rng.random()
        if draw < 0.05:
            return SingleRequest(bad_request(rng))
        if draw < 0.30:
            return AgentSession(rng, num_steps=rng.randint(2, 8), max_model_len=self.max_model_len)
        endpoint: Endpoint = rng.choice(("chat", "completions"))
        stream = rng.random() < 0.6
        if draw < 0.45:
            request = long_request(rng, endpoint, stream)
        else:
            # Varied lengths around the chat shape.
            prompt_tokens, max_tokens = rng.randint(16, 384), rng.randint(8, 256)
            request = chat_request(rng, endpoint, stream, prompt_tokens, max_tokens)
        if stream and rng.random() < 0.2:
            request.abort_after_tokens = rng.randint(1, 16)
        return SingleRequest(request)
