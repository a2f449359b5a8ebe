"""Mask policies of Mask²DiT (docs/method.md §4): which key blocks each query may see.

A policy says, for text queries and for video queries, which of the four key blocks of a
sample - own text, other scenes' text, own video, other scenes' video - they attend to.
Pure Python (no torch), so configuration can validate a policy without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_POLICY", "POLICIES", "BlockRule", "KeySet", "resolve_policy"]


@dataclass(frozen=True)
class KeySet:
    """Which key blocks a query of scene i may see: its own / other scenes' text and video."""

    own_text: bool
    other_text: bool
    own_video: bool
    other_video: bool

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in _BLOCK_NAMES if getattr(self, n))


_BLOCK_NAMES = ("own_text", "other_text", "own_video", "other_video")


@dataclass(frozen=True)
class BlockRule:
    """A mask policy: the key blocks text queries and video queries may attend to.

    Compact string form (for YAML/CLI ablations), kinds separated by ``;``, blocks by ``,``::

        "text:own_text,own_video;video:own_text,own_video,other_video"   # = v2

    Every query kind must see at least one block of its own scene, so that every query row
    has a key even when n = 1.
    """

    text_sees: KeySet
    video_sees: KeySet

    def __post_init__(self) -> None:
        for kind, ks in (("text", self.text_sees), ("video", self.video_sees)):
            if not (ks.own_text or ks.own_video):
                raise ValueError(
                    f"{kind} queries must see own_text or own_video (got {ks.names()}); "
                    f"otherwise a query has no key at n = 1"
                )

    @classmethod
    def parse(cls, spec: str) -> BlockRule:
        """Parse the compact form ``"text:a,b;video:c,d"`` (both kinds required)."""
        sees: dict[str, KeySet] = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            kind, sep, blocks = part.partition(":")
            kind = kind.strip()
            if not sep or kind not in ("text", "video") or kind in sees:
                raise ValueError(
                    f"bad rule part {part!r} in {spec!r}: "
                    "expected 'text:...' and 'video:...' once each"
                )
            names = {b.strip() for b in blocks.split(",") if b.strip()}
            unknown = names - set(_BLOCK_NAMES)
            if unknown:
                raise ValueError(
                    f"unknown key blocks {sorted(unknown)} in {spec!r}; valid: {_BLOCK_NAMES}"
                )
            sees[kind] = KeySet(*(n in names for n in _BLOCK_NAMES))
        if set(sees) != {"text", "video"}:
            raise ValueError(f"rule {spec!r} must give both 'text:' and 'video:' parts")
        return cls(text_sees=sees["text"], video_sees=sees["video"])

    def to_string(self) -> str:
        return f"text:{','.join(self.text_sees.names())};video:{','.join(self.video_sees.names())}"


POLICIES: dict[str, BlockRule] = {
    # The paper's choice: text binds to its scene, video sees all video.
    "v2": BlockRule(KeySet(True, False, True, False), KeySet(True, False, True, True)),
    # The paper's v5: no mask.
    "full": BlockRule(KeySet(True, True, True, True), KeySet(True, True, True, True)),
    # n independent generations.
    "isolated": BlockRule(KeySet(True, False, True, False), KeySet(True, False, True, False)),
}


#: The paper's mask (docs/method.md §4): every default in m2d is this one.
DEFAULT_POLICY = "v2"


def resolve_policy(policy: str | BlockRule) -> BlockRule:
    """A named policy (``v2``, ``full``, ``isolated``), a compact rule string, or a rule."""
    if isinstance(policy, BlockRule):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str or BlockRule, got {type(policy).__name__}")
    if policy in POLICIES:
        return POLICIES[policy]
    if ":" in policy:
        return BlockRule.parse(policy)
    raise ValueError(
        f"unknown mask policy {policy!r}; valid names: {sorted(POLICIES)} "
        f"(or a rule such as 'text:own_text,own_video;video:own_text,own_video,other_video')"
    )
