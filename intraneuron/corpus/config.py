"""The `corpus` config group: which texts, cut into windows of how many tokens (conf/corpus/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from intraneuron.errors import ConfigError


@dataclass
class CorpusConfig:
    name: str = "gutenberg"
    source: str = "gutenberg"
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the source
    window_len: int = 128
    max_tokens: int | None = None
    prepend_bos: bool = True  # every window starts with BOS (the attention sink; see corpus/windows.py)

    def validate(self) -> None:
        """Checks that need no tokenizer, including that local files exist and can be read."""
        from intraneuron.corpus.sources import check_source

        if not isinstance(self.prepend_bos, bool):
            raise ConfigError("corpus.prepend_bos", self.prepend_bos, "true or false")
        if self.window_len < 1 + self.prepend_bos:
            raise ConfigError("corpus.window_len", self.window_len, f"an integer >= {1 + self.prepend_bos}")
        if self.max_tokens is not None and self.max_tokens < self.window_len:
            raise ConfigError(
                "corpus.max_tokens", self.max_tokens, f"null or >= corpus.window_len={self.window_len}"
            )
        check_source(self.source, dict(self.options))

    def windows(self, tokenizer):
        """The corpus as cached token windows (tokenised on the first run only)."""
        from intraneuron.corpus import build_windows, load_source, source_key

        options = dict(self.options)
        return build_windows(
            load_source(self.source, **options),
            tokenizer,
            window_len=self.window_len,
            max_tokens=self.max_tokens,
            prepend_bos=self.prepend_bos,
            source_key=source_key(self.source, **options),
        )
