"""What a routing policy may know about a request before it runs."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 16  # what vLLM generates for a completion without max_tokens


@dataclass(frozen=True)
class RequestInfo:
    """A request as the client sent it: prompt size (and text, for length prediction) and
    the client's output cap (`max_tokens`, None when it set none); never the true output
    length, which only the engine learns as it generates."""

    request_id: str
    prompt_tokens: int
    max_tokens: int | None
    arrival_time: float = 0.0
    tbt_target_s: float | None = None
    prompt_text: str | None = None

    @property
    def decode_tokens(self) -> int:
        """Tokens this request counts in a worker's `decode_tokens_in_flight`: prompt plus
        the client's cap (vLLM's completions default of 16 when it set none), the same
        in the gateway and the simulator."""
        return self.prompt_tokens + (self.max_tokens if self.max_tokens is not None
                                     else DEFAULT_MAX_TOKENS)
