"""What a caller hands the serving engine and gets back: a ``Request``, its ``Event``s, the errors it may raise.

``TextOutput`` turns a request's generated ids into the text its events carry, and ends it at a stop string.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from cogvlm_jax.generation.errors import InputError
from cogvlm_jax.inputs.tokenizer import StreamDecoder


class ContextLengthError(InputError):
    """Prompt plus ``max_tokens`` does not fit the context (or the engine's cache)."""


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class EngineFailedError(EngineStoppedError):
    """The engine's thread died (a device failure it could not recover from): it serves nothing more."""


@dataclasses.dataclass
class Event:
    """What a request receives: new text, and at the end a finish reason (``stop``, ``length``, ``error``)."""

    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: int = 0  # tokens generated so far, the eos included
    error: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclasses.dataclass(eq=False)
class Request:
    """One generation. ``inputs``: a ``Model.build_inputs`` dict; ``on_event`` is called from the engine thread."""

    inputs: dict
    max_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: Sequence[str] = ()
    cancelled: bool = False

    @property
    def prompt_tokens(self) -> int:
        return int(len(self.inputs["input_ids"]))

    def cancel(self) -> None:
        """Stop generating (the engine frees the slot before its next decode chunk)."""
        self.cancelled = True


class TextOutput:
    """Generated ids -> text deltas; holds back text that may be the start of a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.held = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """-> (text to emit, whether a stop string was reached: the text ends right before it)."""
        return self._release(self.held + self.decoder.add(token_id), final=False)

    def flush(self) -> tuple[str, bool]:
        return self._release(self.held + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> tuple[str, bool]:
        self.held = ""
        if not self.stop:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[:min(hits)], True
        if final:
            return text, False
        # Only prefixes up to the text's length can end it: a stop string of any length costs what the text does.
        keep = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        if keep:
            text, self.held = text[:-keep], text[-keep:]
        return text, False
